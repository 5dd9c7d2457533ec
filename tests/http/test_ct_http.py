"""CT classification over HTTP against the real served process: contract shape, real DICOM, hostile uploads."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from bench.soak import role, server_tree
from core import store
from core.cards import CT_CLASSES
from training_export.synthetic_ct import generate_ct_dataset, write_ct_dicom

ROUTE = "/predict/ct_classification"
CLASSES = {"Glioma", "Meningioma", "Pituitary", "No Tumor"}


def upload(http, data: bytes, name: str = "ct.dcm", **form):
    fields = {"patient_id": "P000001", **{k: str(v).lower() if isinstance(v, bool) else v for k, v in form.items()}}
    return http.post(ROUTE, files={"image": (name, data, "application/octet-stream")}, data=fields)


def decode_png(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def assert_error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False and body["error"]["code"] == code
    assert set(body["error"]) == {"code", "message", "details", "timestamp"}


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height but that holds almost no data (a decompression bomb's header)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b"")


def test_ct_small_dicom_with_gradcam_matches_the_contract(http):
    data = open(get_testdata_file("CT_small.dcm"), "rb").read()
    response = upload(http, data, xai=True, request_id="req-ct-1")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and body["request_id"] == "req-ct-1"
    assert body["model_id"] == "ct_classification"
    assert body["model_version"] == str(store.list_versions("neuronova-ct")[0].tag)
    assert body["intended_use"] == "demo, not for clinical use"
    result = body["result"]
    assert set(result["probabilities"]) == CLASSES
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert result["predicted_class"] == max(result["probabilities"], key=result["probabilities"].get)
    gradcam = body["xai"]["grad_cam"]
    assert gradcam["method"] == "grad_cam" and gradcam["layer_name"] == "layer4"
    assert decode_png(gradcam["heatmap_base64"]).size == (128, 128)  # CT_small.dcm is 128×128
    assert decode_png(gradcam["overlay_base64"]).size == (128, 128)
    assert isinstance(gradcam["important_regions"], list)  # CT_small's hot spot is under 100 px: see the next test
    described = body["metadata"]["input"]
    assert described["format"] == "dicom" and described["modality"] == "CT" and described["rows"] == 128
    assert body["inference_time_ms"] > 0


def test_gradcam_regions_box_the_lesion_of_a_synthetic_glioma(http, tmp_path):
    hu, masks, labels = generate_ct_dataset(1, (77, 9), 256)  # one slice per class, the glioma first
    assert CT_CLASSES[labels[0]] == "Glioma" and masks[0].any()
    write_ct_dicom(hu[0], tmp_path / "glioma.dcm")
    body = upload(http, (tmp_path / "glioma.dcm").read_bytes(), xai=True).json()
    assert body["result"]["predicted_class"] == "Glioma"
    regions = body["xai"]["grad_cam"]["important_regions"]
    assert regions, "no important region on a glioma the model finds"
    for region in regions:
        assert region["x"] >= 0 and region["y"] >= 0 and region["width"] * region["height"] >= 100
        assert region["x"] + region["width"] <= 256 and region["y"] + region["height"] <= 256
        assert 0.7 <= region["importance"] <= 1.0
    top = regions[0]
    assert masks[0][top["y"]:top["y"] + top["height"], top["x"]:top["x"] + top["width"]].any()  # on the lesion


def test_mr_dicom_png_and_jpeg_are_classified(http):
    mr = open(get_testdata_file("MR_small.dcm"), "rb").read()
    grey = (np.indices((300, 200)).sum(axis=0) % 256).astype(np.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(jpeg, format="JPEG")
    for name, data in [("mr.dcm", mr), ("slice.png", png_bytes(grey)), ("slice.jpg", jpeg.getvalue())]:
        response = upload(http, data, name=name)
        assert response.status_code == 200, (name, response.text)
        assert set(response.json()["result"]["probabilities"]) == CLASSES
        assert response.json()["xai"] is None


def test_bentoml_client_calls_the_route(server_url, auth_headers, tmp_path):
    path = tmp_path / "ct.dcm"
    path.write_bytes(open(get_testdata_file("CT_small.dcm"), "rb").read())
    token = auth_headers["Authorization"].split()[1]
    with bentoml.SyncHTTPClient(server_url, token=token, timeout=60) as client:
        body = client.predict_ct_classification(image=path, patient_id="P000002")
    assert body["success"] is True and set(body["result"]["probabilities"]) == CLASSES


@pytest.mark.parametrize(
    ("name", "data", "status", "code"),
    [
        ("garbage.dcm", b"\x00\x01garbage" * 100, 400, "INVALID_IMAGE_FORMAT"),
        ("empty.png", b"", 400, "INVALID_IMAGE_FORMAT"),
        ("text.png", b"this is a text file, not a PNG\n" * 10, 400, "INVALID_IMAGE_FORMAT"),
        ("truncated.dcm", open(get_testdata_file("MR_truncated.dcm"), "rb").read(), 400, "INVALID_IMAGE_FORMAT"),
        ("plan.dcm", open(get_testdata_file("rtplan.dcm"), "rb").read(), 400, "INVALID_IMAGE_FORMAT"),
        ("bomb.png", huge_png_header(40000, 40000), 413, "IMAGE_TOO_LARGE"),
    ],
)
def test_hostile_uploads_get_4xx_and_the_server_keeps_serving(http, name, data, status, code):
    assert_error(upload(http, data, name=name), status, code)
    assert http.get("/health").status_code == 200


def test_request_validation_errors(http, server_url):
    data = png_bytes(np.zeros((64, 64), np.uint8))
    assert_error(upload(http, data, patient_id="John Smith"), 400, "INVALID_REQUEST")
    assert_error(upload(http, data, xai=True, xai_methods="shap"), 400, "INVALID_REQUEST")
    assert_error(http.post(ROUTE, data={"patient_id": "P1"}), 400, "INVALID_REQUEST")
    assert_error(http.post(ROUTE, files={"image": ("x.png", data)}, data={"patient_id": "P1"},
                           headers={"Authorization": "Bearer nope"}), 401, "UNAUTHORIZED")


def test_concurrent_requests_all_succeed(http):
    """Many concurrent calls through the runner connection (docs/bentoml-pitfalls.md G2 broke these without runner_connection)."""
    data = png_bytes((np.random.default_rng(0).random((256, 256)) * 255).astype(np.uint8))
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda _: upload(http, data, name="x.png").status_code, range(120)))
    assert statuses == [200] * 120


def test_health_model_info_and_metrics(http, server_url):
    health = http.get("/health").json()
    ct = health["models"]["ct_classification"]
    assert ct["loaded"] is True and ct["version"].startswith("neuronova-ct:") and ct["engine"]
    assert health["memory_usage_mb"] > 0 and health["uptime_seconds"] >= 0
    info = {m["model_id"]: m for m in http.get("/model_info").json()["models"]}["ct_classification"]
    assert set(info["output_classes"]) == CLASSES and info["xai_supported"] == ["grad_cam", "occlusion"]
    assert info["metrics"]["accuracy"] >= 0.9 and info["intended_use"] == "demo, not for clinical use"
    assert info["card"]["provenance"]["synthetic_data"] is True and info["model_size_mb"] > 0
    metrics = http.get("/metrics").text
    assert "bentoml_service_request_total" in metrics and "adaptive_batch_size" in metrics


def test_a_pooled_keep_alive_client_s_connections_are_shared_by_both_api_workers(server_url, auth_headers) -> None:
    """Issue #29: a client pool opening its connections one after another (as Django's or Nginx's upstream pool do)
    gets them spread over the API workers by least connections, not all on the worker that last went idle. Other
    tests' idle keep-alive connections count too: the new ones either spread, or even out the workers' totals."""
    workers = [p for p in server_tree(server_url) if role(p).startswith("neuronova:")]
    assert len(workers) == 2
    port = int(server_url.rsplit(":", 1)[1])

    def established(worker) -> int:
        return sum(1 for c in worker.net_connections("tcp")
                   if c.laddr and c.laddr.port == port and c.raddr and c.status == "ESTABLISHED")

    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    clients = [httpx.Client(base_url=server_url, headers=auth_headers, timeout=120) for _ in range(8)]
    try:
        before = [established(worker) for worker in workers]
        ports = []
        for client in clients:  # each opens its connection and keeps it (keep-alive)
            response = upload(client, data)
            assert response.status_code == 200
            ports.append(response.extensions["network_stream"].get_extra_info("socket").getsockname()[1])
        held = [sum(1 for c in worker.net_connections("tcp") if c.raddr and c.raddr.port in ports)
                for worker in workers]
        totals = [established(worker) for worker in workers]
    finally:
        for client in clients:
            client.close()
    assert sum(held) == 8, held
    assert min(held) >= 2 or max(totals) - min(totals) <= 2, (held, before, totals)
