"""A classifier this project did not train, end to end: card -> import with a validation folder -> served by the CT
runner in-process -> the raw model's probabilities, an occlusion map in the input's geometry, an OOD warning.

The model is built here: 240×240 RGB, channels-last, [0, 1] input, lower-case labels in its own order, softmax
inside. Its conv weights are positive, so its confidence grows with brightness: a white image is over-confident
beyond every validation slice, a black one less sure than any — both outside the calibrated OOD interval.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from PIL import Image

from core import store
from core.cards import CT_CLASSES, ClassificationCard
from core.ood import OOD_WARNING, ood_scores
from core.settings import get_settings
from preprocessing.decode import decode_slice
from preprocessing.transforms import prepare_slice, window_to_unit
from training_export.import_classifier import expected_calibration_error, import_classifier
from training_export.onnx_export import export_onnx
from training_export.synthetic_ct import generate_ct_dataset

SIZE = 240
LABELS = ["notumor", "glioma", "meningioma", "pituitary"]
CONTRACT = {"notumor": "No Tumor", "glioma": "Glioma", "meningioma": "Meningioma", "pituitary": "Pituitary"}
MODEL_LABEL = {contract: label for label, contract in CONTRACT.items()}
SOURCE_SHAPE = (256, 232)  # rows, columns of the uploaded JPEGs: neither the model's size nor square
PARITY = 1e-5


class KerasStyleNet(torch.nn.Module):
    """(N, 240, 240, 3) in [0, 1] -> softmax probabilities over LABELS."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=8, stride=8)
        self.head = torch.nn.Linear(4, len(LABELS))
        with torch.no_grad():
            self.conv.weight.abs_()
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(x.permute(0, 3, 1, 2))).mean(dim=(2, 3))
        return torch.softmax(self.head(features), dim=1)


def _jpeg(grey_unit: np.ndarray) -> bytes:
    rgb = np.repeat((np.clip(grey_unit, 0, 1) * 255).round().astype(np.uint8)[..., None], 3, axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hospital's delivery: model.onnx, card.yaml and a validation folder of JPEG slices named by its labels."""
    root = tmp_path_factory.mktemp("hospital")
    torch.manual_seed(0)
    export_onnx(KerasStyleNet().eval(), torch.zeros(1, SIZE, SIZE, 3), root / "model.onnx")
    card = {
        "name": "St Elsewhere MRI-JPEG classifier", "intended_use": "research use at St Elsewhere",
        "provenance": {"source": "St Elsewhere (Keras export)", "licence": "CC-BY-4.0", "synthetic_data": False},
        "labels": LABELS, "label_map": CONTRACT, "output_kind": "probabilities",
        "input": {"height": SIZE, "width": SIZE, "channels": 3, "layout": "NHWC", "scaling": "unit",
                  "modalities": ["MR", "CT"]},
    }
    (root / "card.yaml").write_text(yaml.safe_dump(card), encoding="utf-8")
    hu, _, labels = generate_ct_dataset(2, seed=3, size=SOURCE_SHAPE[0])
    for i, (slice_hu, label) in enumerate(zip(hu, labels)):
        folder = root / "validation" / MODEL_LABEL[CT_CLASSES[label]]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.jpg").write_bytes(_jpeg(window_to_unit(slice_hu, 40, 80)[:, : SOURCE_SHAPE[1]]))
    return root


@pytest.fixture(scope="module")
def imported(hospital: Path) -> Iterator[str]:
    """The hospital model imported from its card and validation folder (deleted afterwards)."""
    tag = import_classifier(hospital / "model.onnx", hospital / "card.yaml", name="test-foreign",
                            validation_dir=hospital / "validation")
    yield tag
    store.delete_model(tag)


def _admin() -> dict[str, str]:
    auth = get_settings().auth
    token = jwt.encode({"sub": "tests", auth.role_claim: auth.admin_role, "exp": int(time.time()) + 600}, auth.secret,
                       algorithm="HS256")
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def serving(inprocess_client, imported: str) -> Iterator:
    """The in-process service's CT runner switched to the imported model, switched back afterwards."""
    switch = {"model_id": "ct_classification", "version": imported}
    answer = inprocess_client.post("/update_model", json=switch, headers=_admin()).json()
    assert answer["success"] and answer["new_version"] == imported, answer
    yield inprocess_client
    back = {"model_id": "ct_classification", "version": answer["old_version"]}
    assert inprocess_client.post("/update_model", json=back, headers=_admin()).json()["success"]


def _predict(client, data: bytes) -> dict:
    response = client.post("/predict/ct_classification", files={"image": ("slice.jpg", data, "image/jpeg")},
                           data={"patient_id": "P000001", "xai": "true"})
    assert response.status_code == 200, response.text
    return response.json()


def _raw(model_path: Path, card: ClassificationCard, data: bytes) -> np.ndarray:
    """ONNX Runtime in this process on the card-prepared input."""
    tensor = prepare_slice(decode_slice(data, "slice.jpg", max_pixels=2**24), card.input).tensor
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: tensor[None]})[0]


def _median_validation_image(hospital: Path, card: ClassificationCard) -> bytes:
    files = sorted((hospital / "validation").rglob("*.jpg"))
    scores = [float(ood_scores(_raw(hospital / "model.onnx", card, f.read_bytes()), card.output_kind)[0]) for f in files]
    return files[int(np.argsort(scores)[len(scores) // 2])].read_bytes()


def test_import_measures_and_calibrates_on_the_validation_folder(imported: str, hospital: Path) -> None:
    card = store.read_card(store.get_model(imported), ClassificationCard)
    metrics = card.metrics
    confusion = sum(v for k, v in metrics.items() if k.startswith("validation_confusion_"))
    assert metrics["validation_n"] == 8 == confusion
    # measured again here: the raw model on each validation slice, the truth from its folder
    files = sorted((hospital / "validation").rglob("*.jpg"))
    probabilities = np.concatenate([_raw(hospital / "model.onnx", card, f.read_bytes()) for f in files])
    truth = np.array([LABELS.index(f.parent.name) for f in files])
    assert metrics["validation_accuracy"] == pytest.approx(np.mean(probabilities.argmax(axis=1) == truth), abs=1e-4)
    assert metrics["validation_ece"] == pytest.approx(expected_calibration_error(probabilities, truth), abs=1e-4)
    assert card.ood is not None and card.ood.score == "max_softmax" and card.ood.n_images == 8
    assert card.ood.low < card.ood.high


def test_served_like_the_raw_model_with_an_occlusion_map(serving, hospital: Path, imported: str) -> None:
    card = store.read_card(store.get_model(imported), ClassificationCard)
    data = _median_validation_image(hospital, card)
    body = _predict(serving, data)
    raw = _raw(hospital / "model.onnx", card, data)[0]
    served = np.array([body["result"]["probabilities"][CONTRACT[label]] for label in LABELS])
    assert body["model_version"] == imported and np.abs(served - raw).max() <= PARITY
    occlusion = body["xai"]["occlusion"]
    assert set(body["xai"]) == {"occlusion"} and occlusion["method"] == "occlusion" and occlusion["layer_name"] is None
    heatmap = Image.open(io.BytesIO(base64.b64decode(occlusion["heatmap_base64"].split(",", 1)[1])))
    assert (heatmap.height, heatmap.width) == SOURCE_SHAPE
    assert body["warnings"] == [f"{imported} has no differentiable weights for Grad-CAM; explained by occlusion sensitivity"]


@pytest.mark.parametrize("grey", [0.0, 1.0])
def test_inputs_unlike_the_validation_images_are_flagged(serving, grey: float) -> None:
    body = _predict(serving, _jpeg(np.full(SOURCE_SHAPE, grey)))
    assert OOD_WARNING in body["warnings"]


def test_model_info_shows_validation_and_the_explanation_method(serving, imported: str) -> None:
    info = {m["model_id"]: m for m in serving.get("/model_info").json()["models"]}["ct_classification"]
    assert info["version"] == imported and info["xai_supported"] == ["occlusion"]
    assert info["metrics"]["validation_n"] == 8 and "validation_ece" in info["metrics"]
    assert info["card"]["ood"]["n_images"] == 8


def test_explain_later_substitutes_occlusion_for_grad_cam(serving, imported: str) -> None:
    request_id = _predict(serving, _jpeg(np.full(SOURCE_SHAPE, 0.3)))["request_id"]
    later = serving.post("/xai/explain", json={"request_id": request_id, "xai_methods": ["grad_cam"],
                                               "options": {"occlusion": {"colormap": "viridis"}}})
    assert later.status_code == 200, later.text
    body = later.json()
    assert list(body["xai"]) == ["occlusion"] and body["xai"]["occlusion"]["colormap"] == "viridis"
    assert body["warnings"] == [f"{imported} has no differentiable weights for Grad-CAM; explained by occlusion sensitivity"]
    bad = serving.post("/xai/explain", json={"request_id": request_id, "xai_methods": ["occlusion"],
                                             "options": {"occlusion": {"colormap": "no-such-map"}}})
    assert bad.status_code == 400 and "no-such-map" in bad.json()["error"]["message"]
