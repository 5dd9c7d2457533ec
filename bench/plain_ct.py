"""The plain CT server of the original design, the baseline `bench/ct.py` measures the service against.

Flask under `gunicorn -w 2`: pydicom → Hounsfield units → clip and window → PIL resize to the model's size →
ONNX Runtime, batch 1, one intra-op thread → softmax → JSON. No auth, no limits, no explanations, no cache.
It serves the same stored model as the service: `PLAIN_CT_CONFIG` names a JSON file that `bench/ct.py` writes from
the model's card (onnx, labels, hu_clip, window, height, width, channels, layout, output_kind, scale, shift).

Run: `PLAIN_CT_CONFIG=cfg.json gunicorn -w 2 -b 127.0.0.1:3102 bench.plain_ct:app` (from the repository root).
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import onnxruntime as ort
import pydicom
from flask import Flask, jsonify, request
from PIL import Image

CONFIG = json.loads(open(os.environ["PLAIN_CT_CONFIG"]).read())
options = ort.SessionOptions()
options.intra_op_num_threads = 1
SESSION = ort.InferenceSession(CONFIG["onnx"], sess_options=options, providers=["CPUExecutionProvider"])
INPUT = SESSION.get_inputs()[0].name
app = Flask(__name__)


def prepare(data: bytes) -> np.ndarray:
    """DICOM bytes -> (1, C, H, W) or (1, H, W, C) float32 model input."""
    dataset = pydicom.dcmread(io.BytesIO(data))
    hu = dataset.pixel_array.astype(np.float32) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    center, width = CONFIG["window"]
    unit = (np.clip(hu, *CONFIG["hu_clip"]) - (center - width / 2)) / width
    image = Image.fromarray(np.clip(unit, 0.0, 1.0).astype(np.float32), mode="F")
    resized = np.asarray(image.resize((CONFIG["width"], CONFIG["height"]), Image.BILINEAR), dtype=np.float32)
    scaled = resized * CONFIG["scale"] + CONFIG["shift"]
    if CONFIG["layout"] == "NHWC":
        return np.repeat(scaled[None, :, :, None], CONFIG["channels"], axis=3)
    return np.repeat(scaled[None, None], CONFIG["channels"], axis=1)


@app.post("/predict/ct_classification")
def predict():
    outputs = SESSION.run(None, {INPUT: prepare(request.files["image"].read())})[0][0].astype(np.float64)
    if CONFIG["output_kind"] == "logits":
        outputs = np.exp(outputs - outputs.max())
    probabilities = outputs / outputs.sum()
    top = int(probabilities.argmax())
    return jsonify({"success": True, "model_version": CONFIG["version"], "patient_id": request.form.get("patient_id"),
                    "result": {"predicted_class": CONFIG["labels"][top], "confidence": float(probabilities[top]),
                               "probabilities": dict(zip(CONFIG["labels"], probabilities.round(6).tolist()))}})
