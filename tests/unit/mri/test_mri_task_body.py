"""The task body with a stand-in runner: mixed NIfTI + DICOM uploads, the reference grid, xai with and without
torch weights, progress steps recorded."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from api.models import RunnerModel
from api.mri import SegmentationRequest, segment_mri
from core.tasks import TaskStore
from postprocessing.masks import PostProcessingOptions
from tests.unit.mri.mri_inputs import LIMITS, card, case_dicom_files, nifti_bytes, small_case


class StandInSlot:
    """Answers like the MRI runner: oedema in a central block, a flat attention map."""

    model_id = "mri_segmentation"

    def __init__(self, gradcam_layer: str | None) -> None:
        self.model = RunnerModel(tag="stand-in:1", card=card(), describe={"gradcam_layer": gradcam_layer})
        self.calls: list[str] = []

    async def loaded(self) -> RunnerModel:
        return self.model

    async def call(self, method: str, volume: np.ndarray, task_id: str) -> np.ndarray:
        self.calls.append(method)
        if method == "explain":
            return np.linspace(0, 1, volume[0].size, dtype=np.float32).reshape(volume.shape[1:])
        probabilities = np.zeros((4, *volume.shape[1:]), np.float16)
        probabilities[0] = 1
        center = tuple(slice(n // 3, 2 * n // 3) for n in volume.shape[1:])
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


def test_gradcam_on_the_preview_slice(tmp_path) -> None:
    case = small_case()
    slot = StandInSlot(gradcam_layer="up_layers.1")
    response, _ = run(tmp_path, slot, {"case_flair.nii": nifti_bytes(case.volume.data[3], case.volume.affine)},
                      sequence_type=None, xai=True)
    explanation = response.xai["grad_cam"]
    assert explanation.layer_name == "up_layers.1" and explanation.slice_index == response.result.mask_preview.slice_index
    assert explanation.overlay_base64.startswith("data:image/png;base64,") and slot.calls == ["segment", "explain"]
