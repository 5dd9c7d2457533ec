"""The demo CT model (torch weights) explains by Grad-CAM and, on request, by occlusion: each map keyed by its method."""

from __future__ import annotations

from pathlib import Path

from pydicom.data import get_testdata_file

CT_SMALL = Path(get_testdata_file("CT_small.dcm")).read_bytes()


def test_both_methods_on_request_each_named(inprocess_client) -> None:
    response = inprocess_client.post("/predict/ct_classification", files={"image": ("ct.dcm", CT_SMALL)},
                                     data={"patient_id": "P1", "xai": "true", "xai_methods": '["grad_cam", "occlusion"]'})
    assert response.status_code == 200, response.text
    xai = response.json()["xai"]
    assert {name: map_["method"] for name, map_ in xai.items()} == {"grad_cam": "grad_cam", "occlusion": "occlusion"}
    assert xai["grad_cam"]["layer_name"] == "layer4" and xai["occlusion"]["layer_name"] is None
    later = inprocess_client.post("/xai/explain", json={"request_id": response.json()["request_id"], "xai_methods": []})
    assert later.status_code == 400 and "empty" in later.json()["error"]["message"]


def test_model_info_lists_both_methods(inprocess_client) -> None:
    models = {m["model_id"]: m for m in inprocess_client.get("/model_info").json()["models"]}
    assert models["ct_classification"]["xai_supported"] == ["grad_cam", "occlusion"]
