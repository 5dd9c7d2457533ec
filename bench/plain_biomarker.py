"""The plain biomarker server of the original design, the baseline `bench/biomarker.py` measures the service against.

Flask under `gunicorn -w 2`: nested JSON → one feature row (numbers as given, booleans 0/1, a category by its index,
missing as NaN) → one XGBoost booster per head → probabilities, and with `xai` exact TreeSHAP (XGBoost's
`pred_contribs`, the values `shap.TreeExplainer` gives for XGBoost) → JSON. No auth, no limits, no schema checks.
`PLAIN_BIOMARKER_CONFIG` names a JSON file that `bench/biomarker.py` writes from the stored model's card
(features: name, type, categories; heads: name, classes, model_file; version).

Run: `PLAIN_BIOMARKER_CONFIG=cfg.json gunicorn -w 2 -b 127.0.0.1:3103 bench.plain_biomarker:app`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import xgboost as xgb
from flask import Flask, jsonify, request

CONFIG = json.loads(open(os.environ["PLAIN_BIOMARKER_CONFIG"]).read())
FEATURES = CONFIG["features"]
BOOSTERS = [xgb.Booster(params={"nthread": 1}, model_file=head["model_file"]) for head in CONFIG["heads"]]
app = Flask(__name__)


def encode(record: dict[str, Any]) -> np.ndarray:
    """The nested record as a (1, F) float32 row in the card's feature order."""
    row = []
    for feature in FEATURES:
        value: Any = record
        for key in feature["name"].split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            row.append(math.nan)
        elif feature["type"] == "category":
            row.append(float(feature["categories"].index(value)))
        else:
            row.append(float(value))
    return np.array([row], dtype=np.float32)


@app.post("/predict/biomarker_prediction")
def predict():
    body = request.get_json()
    data = xgb.DMatrix(encode(body["biomarkers"]), nthread=1)
    result, shap = {}, {}
    for head, booster in zip(CONFIG["heads"], BOOSTERS):
        probabilities = booster.predict(data)[0]
        top = int(probabilities.argmax())
        result[head["name"]] = {"predicted_class": head["classes"][top], "confidence": float(probabilities[top]),
                                "probabilities": dict(zip(head["classes"], probabilities.round(6).tolist()))}
        if body.get("xai"):
            contributions = booster.predict(data, pred_contribs=True)[0][top]
            shap[head["name"]] = {"base_value": float(contributions[-1]),
                                  "values": {f["name"]: float(v) for f, v in zip(FEATURES, contributions[:-1])}}
    return jsonify({"success": True, "model_version": CONFIG["version"], "result": result,
                    "xai": {"shap": shap} if shap else None})
