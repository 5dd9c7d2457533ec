"""NeuroNova Inference: the public API. Validation, auth, response shaping; the models live in `runners/`."""

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import bentoml
import psutil
from fastapi import FastAPI
from pydantic import Field
from starlette.responses import JSONResponse

from api.auth import PUBLIC_PATHS, JWTAuthMiddleware
from api.errors import ErrorSchemaMiddleware, handles_errors
from api.limits import BodyLimitMiddleware, RateLimitMiddleware
from api.models import ModelSlot
from api.shaping import (
    class_probabilities,
    describe_slice,
    elapsed_ms,
    heatmap_explanation,
    modality_warnings,
    new_request_id,
    response_metadata,
)
from core.cards.classification import ClassificationCard
from core.errors import InvalidRequest
from core.schemas import CTClassificationResponse, HealthResponse, ModelInfoResponse
from core.settings import get_settings
from preprocessing.decode import decode_slice
from preprocessing.transforms import prepare_slice
from runners.common import cuda_available, gpu_devices
from runners.ct import CTClassifier

log = logging.getLogger("neuronova")
settings = get_settings()
ops = FastAPI(title="NeuroNova operations", openapi_url=None, docs_url=None, redoc_url=None)

PATIENT_ID = Field(pattern=settings.patient_id_pattern, description="anonymised patient id, e.g. P123456")
GRAD_CAM = "grad_cam"


@bentoml.service(name="neuronova", workers=2, traffic={"timeout": 300})
@bentoml.asgi_app(ops, path="/")
class NeuroNova:
    """Brain-tumour AI for clinical decision support: CT classification, MRI segmentation, biomarkers."""

    ct_runner = bentoml.depends(CTClassifier)

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.ct = ModelSlot("ct_classification", self.ct_runner, ClassificationCard)

    @bentoml.api(route="/predict/ct_classification")
    @handles_errors
    async def predict_ct_classification(
        self,
        image: Path,
        patient_id: str = PATIENT_ID,
        request_id: str | None = Field(default=None, max_length=128),
        xai: bool = False,
        xai_methods: list[str] | str = Field(default_factory=lambda: [GRAD_CAM]),
        metadata: dict[str, Any] | None = None,
    ) -> CTClassificationResponse:
        """Classify one CT (or MR, as the model's card allows) slice; Grad-CAM on request."""
        started = time.perf_counter()
        model = await self.ct.loaded()
        card: ClassificationCard = model.card
        methods = [xai_methods] if isinstance(xai_methods, str) else xai_methods
        if xai and set(methods) - {GRAD_CAM}:
            raise InvalidRequest(f"unsupported xai_methods {sorted(set(methods) - {GRAD_CAM})}; supported: ['grad_cam']")
        data = image.read_bytes()
        decoded = decode_slice(
            data, image.name, max_pixels=settings.limits.max_image_pixels,
            allow_multiframe=card.input.allow_multiframe, modalities=card.input.modalities,
        )
        prepared = prepare_slice(decoded, card.input)
        batch = prepared.tensor[None]
        calls = [self.ct.call("predict", batch)] + ([self.ct.call("explain", batch)] if xai else [])
        outputs = await asyncio.gather(*calls)
        result = class_probabilities(outputs[0][0], card.contract_labels())
        explanation = None
        if xai:
            explanation = {GRAD_CAM: heatmap_explanation(
                outputs[1][0], prepared.display, method=GRAD_CAM, target_class=result.predicted_class,
                layer_name=model.describe.get("gradcam_layer"),
            )}
        return CTClassificationResponse(
            request_id=new_request_id(request_id), model_id=self.ct.model_id, model_version=model.tag,
            intended_use=card.intended_use, inference_time_ms=elapsed_ms(started), result=result, xai=explanation,
            warnings=modality_warnings(decoded, card.input.modalities),
            metadata=response_metadata(describe_slice(decoded, data), metadata),
        )

    @ops.get("/health")
    async def health(self) -> JSONResponse:
        """Liveness of every model: 200 healthy, or 503 degraded naming the model that failed to load."""
        statuses = {slot.model_id: await slot.status() for slot in self._slots()}
        body = HealthResponse(
            status="healthy" if all(s.loaded for s in statuses.values()) else "degraded",
            version=settings.version,
            models=statuses,
            gpu_available=cuda_available(),
            gpu_devices=gpu_devices(),
            memory_usage_mb=round(_server_rss_mb(), 1),
            uptime_seconds=round(time.monotonic() - self.started, 1),
        )
        return JSONResponse(body.model_dump(mode="json"), status_code=200 if body.status == "healthy" else 503)

    @ops.get("/model_info")
    async def model_info(self) -> ModelInfoResponse:
        """Every loaded model's card, metrics, size and live inference time."""
        infos = [await slot.info() for slot in self._slots()]
        return ModelInfoResponse(models=[info for info in infos if info is not None])

    def _slots(self) -> list[ModelSlot]:
        return [self.ct]


def _server_rss_mb() -> float:
    """Resident memory of the whole server: this worker's process tree from the BentoML arbiter down."""
    me = psutil.Process(os.getpid())
    root = me.parent() if me.parent() is not None and "bentoml" in " ".join(me.parent().cmdline()) else me
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


NeuroNova.add_asgi_middleware(RateLimitMiddleware, rate_limit=settings.rate_limit, exempt_paths=PUBLIC_PATHS)
NeuroNova.add_asgi_middleware(JWTAuthMiddleware, auth=settings.auth)
NeuroNova.add_asgi_middleware(BodyLimitMiddleware, limits=settings.limits)
NeuroNova.add_asgi_middleware(ErrorSchemaMiddleware)
