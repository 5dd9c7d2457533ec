"""A hospital's own ONNX segmenter imports from a card; a card that disagrees with the graph is refused, unstored."""

import pytest
import torch

from core import store
from core.cards import DEMO_INTENDED_USE, Provenance
from core.cards.segmentation import SegmentationCard, SlidingWindowSpec
from core.errors import ModelCardError
from training_export.import_segmenter import import_segmenter
from training_export.onnx_export import export_onnx

NAME = "test-foreign-segmenter"
ROI = (16, 16, 16)


class TinySegmenter(torch.nn.Module):
    def __init__(self, sequences: int, labels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(sequences, labels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def card(**changes) -> SegmentationCard:
    base = SegmentationCard(name="their segmenter", intended_use=DEMO_INTENDED_USE, inference=SlidingWindowSpec(roi_size=ROI),
                            provenance=Provenance(source="another hospital", synthetic_data=False))
    return base.model_copy(update=changes)


@pytest.fixture()
def onnx_file(tmp_path):
    labels = len(card().labels)
    path = export_onnx(TinySegmenter(4, labels).eval(), torch.zeros((1, 4, *ROI)), tmp_path / "seg.onnx")
    yield path
    for model in store.list_versions(NAME):
        store.delete_model(str(model.tag))


def test_good_card_imports_and_reads_back(onnx_file, tmp_path):
    card_path = tmp_path / "card.json"
    card_path.write_text(card().model_dump_json())
    tag = import_segmenter(onnx_file, card_path, name=NAME)
    assert store.read_card(store.get_model(tag), SegmentationCard).name == "their segmenter"


def test_lying_cards_are_refused_and_nothing_is_stored(onnx_file):
    three_sequences = card().input.model_copy(update={"sequences": ["T1", "T2", "FLAIR"]})
    with pytest.raises(ModelCardError, match="input sequences"):
        import_segmenter(onnx_file, card(input=three_sequences), name=NAME)
    with pytest.raises(ModelCardError, match="torch"):
        import_segmenter(onnx_file, card(torch=card().torch or {"kwargs": {}}), name=NAME)
    assert store.list_versions(NAME) == []


def test_cli_imports_and_refuses(onnx_file, tmp_path, capsys):
    from training_export.__main__ import main

    good = tmp_path / "card.yaml"
    good.write_text(card().model_dump_json())  # JSON is valid YAML
    assert main(["import-segmenter", "--model", str(onnx_file), "--card", str(good), "--name", NAME]) == 0
    assert capsys.readouterr().out.strip().startswith(f"{NAME}:")
    bad = tmp_path / "bad.json"
    bad.write_text(card(inference=SlidingWindowSpec(roi_size=(32, 32, 32))).model_dump_json())
    assert main(["import-segmenter", "--model", str(onnx_file), "--card", str(bad), "--name", NAME]) == 2


def study_folder(tmp_path, studies: int):
    """In-distribution studies as a hospital would lay them out: 4D NIfTI files and one folder of per-sequence files."""
    from tests.unit.mri.mri_inputs import four_d_nifti, nifti_bytes
    from training_export.synthetic_mri import synthetic_case

    folder = tmp_path / "validation"
    folder.mkdir(parents=True)
    for seed in range(studies - 1):
        (folder / f"study{seed}.nii").write_bytes(four_d_nifti(synthetic_case(seed, (24, 24, 16), (8.0, 8.0, 8.0))))
    last = synthetic_case(99, (24, 24, 16), (8.0, 8.0, 8.0))
    (folder / "study_last").mkdir()
    for index, sequence in enumerate(("t1", "t1ce", "t2", "flair")):
        (folder / "study_last" / f"{sequence}.nii").write_bytes(nifti_bytes(last.volume.data[index], last.volume.affine))
    return folder


def test_validation_studies_calibrate_the_ood_warning(onnx_file, tmp_path):
    import numpy as np

    from core.cards.segmentation import VolumeInputSpec

    coarse = card(input=VolumeInputSpec(target_spacing_mm=(8.0, 8.0, 8.0)))
    with pytest.raises(ModelCardError, match="needs at least 10"):
        import_segmenter(onnx_file, coarse, name=NAME, validation_dir=study_folder(tmp_path / "few", 4))
    assert store.list_versions(NAME) == []
    tag = import_segmenter(onnx_file, coarse, name=NAME, validation_dir=study_folder(tmp_path, 10))
    ood = store.read_card(store.get_model(tag), SegmentationCard).ood
    assert ood is not None and ood.n_studies == 10 and ood.threshold > 0
    assert ood.descriptors[0] == "log_brain_ml" and np.isfinite(ood.mean).all()
