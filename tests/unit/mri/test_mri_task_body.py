"""The task body with a stand-in runner: mixed NIfTI + DICOM uploads, the reference grid, xai with and without
torch weights, progress steps recorded."""

from __future__ import annotations

import asyncio
from pathlib import Path

import base64
import gzip

import nibabel as nib
import numpy as np
import pytest

from pipelines.runner_slots import ModelSlot, RunnerModel
from pipelines.mri import NO_OOD_CALIBRATION_WARNING, SegmentationRequest, segment_mri, zero_filled_warning
from core.cards.segmentation import MRI_SEQUENCES, VolumeInputSpec, VolumeIntervalCalibration
from core.errors import InvalidRequest, ModelInferenceError
from core.ood import OOD_WARNING
from core.volume_ood import VolumeOodCalibration, descriptor_names
from state.tasks import TaskStore
from postprocessing.masks import PostProcessingOptions
from tests.unit.mri.mri_inputs import LIMITS, card, case_dicom_files, four_d_nifti, nifti_bytes, small_case


class StandInSlot:
    """Answers like the MRI runner: oedema in a central block, a flat attention map."""

    model_id = "mri_segmentation"

    on_served_model = ModelSlot.on_served_model  # the real switch handling, over this stand-in's loaded() and forget()

    def __init__(self, gradcam_layer: str | None, switches_during_inference: int = 0) -> None:
        self.model = RunnerModel(tag="stand-in:1", card=card(),
                                 describe={"gradcam_layer": gradcam_layer, "generation": 1})
        self.switches_left = switches_during_inference
        self.calls: list[str] = []

    async def loaded(self) -> RunnerModel:
        return self.model

    def forget(self) -> None:
        pass

    async def generation_now(self) -> int | None:
        return self.model.describe.get("generation")

    async def call(self, method: str, volume: np.ndarray, task_id: str, retry_stale: bool = True) -> np.ndarray:
        self.calls.append(method)
        if self.switches_left:  # an admin switches the model meanwhile: the runner serves the next version
            self.switches_left -= 1
            generation = self.model.describe["generation"] + 1
            self.model = RunnerModel(tag=f"stand-in:{generation}", card=self.model.card,
                                     describe={**self.model.describe, "generation": generation})
        if method == "explain":
            return np.linspace(0, 1, volume[0].size, dtype=np.float32).reshape(volume.shape[1:])
        if method == "segment_passes":  # the mirrored passes disagree about a growing block
            return np.stack([oedema_block(volume.shape[1:], 3 + k / 8) for k in range(8)])
        return oedema_block(volume.shape[1:], 3)


def oedema_block(shape: tuple[int, ...], divisor: float) -> np.ndarray:
    """Probabilities: oedema in a central block starting at n / divisor, background elsewhere."""
    probabilities = np.zeros((4, *shape), np.float16)
    probabilities[0] = 1
    center = tuple(slice(int(n // divisor), 2 * n // 3) for n in shape)
    probabilities[(0, *center)], probabilities[(2, *center)] = 0, 1
    return probabilities


def run(tmp_path: Path, slot: StandInSlot, uploads: dict[str, bytes], **options):
    paths = []
    for name, data in uploads.items():
        path = tmp_path / name
        path.write_bytes(data)
        paths.append(path)
    tasks = TaskStore(tmp_path / "tasks.sqlite")
    tasks.create("body", "req", slot.model_id)
    request = SegmentationRequest(task_id="body", request_id="req", images=paths,
                                  post_processing=PostProcessingOptions(), **options)
    return asyncio.run(segment_mri(slot, tasks, request, LIMITS)), tasks.get("body")


def test_mixed_upload_uses_the_finest_grid_and_skips_gradcam_without_weights(tmp_path) -> None:
    case = small_case()
    coarse = case_dicom_files(case, sequences=("FLAIR",))["FLAIR"][::2]
    uploads = {f"flair_{i}.dcm": data for i, data in enumerate(coarse)}
    uploads["t1.nii"] = nifti_bytes(case.volume.data[0], case.volume.affine)
    slot = StandInSlot(gradcam_layer=None)
    response, record = run(tmp_path, slot, uploads, sequence_type=None, xai=True)
    assert response.volume.reference_sequence == "T1" and response.volume.format == "nifti"
    assert response.result.dicom_seg_base64 is None and response.xai is None
    assert "this model has no differentiable weights, so no Grad-CAM map was made" in response.warnings
    assert response.result.tumor_detected and slot.calls == ["segment"]
    assert record.current_step == "writing_outputs" and record.progress == 94
    assert response.volume.missing_sequences == ["T1ce", "T2"]
    assert [w for w in response.warnings if "zero-filled" in w] == [zero_filled_warning("T1ce"), zero_filled_warning("T2")]
    assert response.result.confidence == "reduced" and response.result.confidence_reasons == ["sequences_zero_filled"]
    assert NO_OOD_CALIBRATION_WARNING in response.warnings and response.result.ood_check is None
    assert response.result.uncertainty is None


def test_a_model_switch_during_the_task_runs_it_again_on_the_new_model(tmp_path) -> None:
    slot = StandInSlot(gradcam_layer=None, switches_during_inference=1)
    response, record = run(tmp_path, slot, {"case.nii": four_d_nifti(small_case())}, sequence_type=None, xai=False)
    assert response.model_version == "stand-in:2" and slot.calls == ["segment", "segment"]
    assert response.result.tumor_detected and record.current_step == "writing_outputs"


def test_a_model_switched_again_and_again_fails_the_task_instead_of_naming_the_wrong_model(tmp_path) -> None:
    slot = StandInSlot(gradcam_layer=None, switches_during_inference=5)
    with pytest.raises(ModelInferenceError, match="switched repeatedly") as failed:
        run(tmp_path, slot, {"case.nii": four_d_nifti(small_case())}, sequence_type=None, xai=False)
    assert failed.value.details == {"reason": "model_switched"} and slot.calls == ["segment", "segment"]


def test_missing_required_sequence_is_refused_by_name_before_decoding(tmp_path) -> None:
    slot = StandInSlot(gradcam_layer=None)
    slot.model = RunnerModel(tag="strict:1", card=card(input=VolumeInputSpec()), describe={})
    with pytest.raises(InvalidRequest, match=r"lacks required sequence\(s\) \['T1', 'T1ce', 'T2'\]"):
        run(tmp_path, slot, {"flair.nii": b"not even decoded"}, sequence_type="FLAIR", xai=False)
    assert slot.calls == []


def test_out_of_distribution_input_is_warned_and_confidence_reduced(tmp_path) -> None:
    case = small_case()
    names = descriptor_names(MRI_SEQUENCES)
    far = VolumeOodCalibration(descriptors=names, mean=[100.0] * len(names), precision=np.eye(len(names)).tolist(),
                               threshold=3.0, coverage=97.5, n_studies=10)
    slot = StandInSlot(gradcam_layer=None)
    slot.model = RunnerModel(tag="calibrated:1", card=card(ood=far), describe={})
    response, _ = run(tmp_path, slot, {"case.nii": four_d_nifti(case)}, sequence_type=None, xai=False)
    assert response.result.ood_check.flagged and response.result.ood_check.distance > 3.0
    assert OOD_WARNING in response.warnings and response.result.confidence_reasons == ["out_of_distribution"]
    near = far.model_copy(update={"threshold": 1e9})
    slot.model = RunnerModel(tag="calibrated:2", card=card(ood=near), describe={})
    response, _ = run(tmp_path, slot, {"case.nii": four_d_nifti(case)}, sequence_type=None, xai=False)
    assert not response.result.ood_check.flagged and response.result.confidence == "normal"
    assert response.warnings == []


def test_uncertainty_map_preview_and_volume_intervals(tmp_path) -> None:
    case = small_case()
    slot = StandInSlot(gradcam_layer=None)
    intervals = VolumeIntervalCalibration(margins={"WT": 0.1, "TC": 0.0, "ET": 0.0}, coverage=90, n_cases=20)
    slot.model = RunnerModel(tag="tta:1", card=card(volume_interval=intervals), describe={})
    response, _ = run(tmp_path, slot, {"case.nii": four_d_nifti(case)}, sequence_type=None, xai=False,
                      uncertainty=True)
    assert slot.calls == ["segment_passes"]
    uncertainty = response.result.uncertainty
    assert uncertainty.passes == 8 and uncertainty.preview_base64.startswith("data:image/png;base64,")
    assert uncertainty.slice_index == response.result.mask_preview.slice_index
    image = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(uncertainty.map.data_base64)))
    percent = np.asarray(image.dataobj)
    assert percent.dtype == np.uint8 and percent.shape == case.volume.shape and 0 < percent.max() <= 100
    np.testing.assert_allclose(image.affine, case.volume.affine, atol=1e-5)
    assert uncertainty.mean_in_tumour is not None and 0 <= uncertainty.mean_in_tumour <= 1
    wt = uncertainty.volume_interval_ml["WT"]
    assert 0 < wt.low < wt.high and wt.margin == 0.1 and uncertainty.volume_interval_ml["ET"].high == 0.0
    assert response.result.tumor_volume_ml.total > 0 and uncertainty.compute_time_ms > 0


def test_gradcam_on_the_preview_slice(tmp_path) -> None:
    case = small_case()
    slot = StandInSlot(gradcam_layer="up_layers.1")
    response, _ = run(tmp_path, slot, {"case_flair.nii": nifti_bytes(case.volume.data[3], case.volume.affine)},
                      sequence_type=None, xai=True)
    explanation = response.xai["grad_cam"]
    assert explanation.layer_name == "up_layers.1" and explanation.slice_index == response.result.mask_preview.slice_index
    assert explanation.overlay_base64.startswith("data:image/png;base64,") and slot.calls == ["segment", "explain"]


def test_a_queued_task_keeps_the_pseudonym_its_seg_carries() -> None:
    """Distributed mode: the replica that runs a queued task writes the submitter's `patient_id` into the SEG; a task
    queued before the field existed runs with none."""
    request = SegmentationRequest(task_id="queued", request_id="req", images=(), sequence_type=None, xai=False,
                                  post_processing=PostProcessingOptions(), patient_id="P000123")
    params = request.queued_params()
    assert SegmentationRequest.from_queued("queued", params, ()).patient_id == "P000123"
    del params["patient_id"]
    assert SegmentationRequest.from_queued("queued", params, ()).patient_id == ""
