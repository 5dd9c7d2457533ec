"""The synthetic MRI generator: deterministic, BraTS labels, plausible contrasts, anatomy in millimetres."""

from __future__ import annotations

import numpy as np

from core.cards.segmentation import MRI_SEQUENCES
from training_export.synthetic_mri import ras_affine, synthetic_case


def test_same_seed_same_case_other_seed_other_case() -> None:
    first, again, other = synthetic_case(5, (40, 40, 30), (5.0, 5.0, 5.0)), synthetic_case(5, (40, 40, 30), (5.0, 5.0, 5.0)), \
        synthetic_case(6, (40, 40, 30), (5.0, 5.0, 5.0))
    np.testing.assert_array_equal(first.volume.data, again.volume.data)
    np.testing.assert_array_equal(first.labels, again.labels)
    assert not np.array_equal(first.labels, other.labels)


def test_labels_contrasts_and_background() -> None:
    case = synthetic_case(1)
    volume, labels = case.volume, case.labels
    assert volume.sequences == MRI_SEQUENCES and volume.data.shape == (4, 96, 96, 64)
    assert set(np.unique(labels)) == {0, 1, 2, 4}
    t1, t1ce, t2, flair = volume.data
    mean = lambda image, value: float(image[labels == value].mean())
    assert mean(t1ce, 4) > 1.5 * mean(t1, 4)  # the rim enhances
    assert mean(flair, 2) > mean(flair, 1) and mean(t2, 2) > mean(t1, 2)  # oedema bright on FLAIR and T2
    assert (volume.data[:, 0, 0, 0] == 0).all() and (volume.data >= 0).all()
    np.testing.assert_array_equal(volume.affine, ras_affine((96, 96, 64), (2.0, 2.0, 2.0)))


def test_a_case_without_tumour_is_a_brain_with_no_labels() -> None:
    healthy = synthetic_case(6, (48, 44, 30), (4.0, 4.0, 5.0), tumour=False)
    assert not healthy.labels.any() and (healthy.volume.data > 0).mean() > 0.2


def test_anatomy_is_laid_out_in_millimetres() -> None:
    fine, coarse = synthetic_case(2, (96, 96, 64), (2.0, 2.0, 2.0)), synthetic_case(2, (48, 48, 32), (4.0, 4.0, 4.0))
    tumour_ml = [(case.labels > 0).sum() * np.prod(case.volume.spacing) / 1000 for case in (fine, coarse)]
    assert abs(tumour_ml[0] - tumour_ml[1]) < 0.3 * tumour_ml[0]


def test_decoded_volume_checks_its_shape() -> None:
    import pytest

    from core.volumes import DecodedVolume

    with pytest.raises(ValueError, match="one channel per sequence"):
        DecodedVolume(data=np.zeros((2, 3, 3, 3)), affine=np.eye(4), sequences=("T1",), sources=(), reference_sequence="T1")
    with pytest.raises(ValueError, match="4x4"):
        DecodedVolume(data=np.zeros((1, 3, 3, 3)), affine=np.eye(3), sequences=("T1",), sources=(), reference_sequence="T1")
