"""NeuroNova Inference: the public API. Validation, auth, response shaping; the models live in `runners/`."""

import asyncio
import importlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import bentoml
import psutil
from fastapi import FastAPI, Query
from pydantic import Field, StrictBool
from starlette.responses import JSONResponse

from api import accept_balance, bentoml_patches
from api.access_log import AccessLogMiddleware
from api.auth import PUBLIC_PATHS, JWTAuthMiddleware, check_start, current_owner, current_subject, serving_host
from pipelines.biomarker import predict_record
from pipelines.classification import (
    ExplainOptions,
    cached_classification,
    classify_slice,
    explain_cached,
    explanations,
    requested_methods,
)
from pipelines.coalescing import batched_methods
from api.errors import ErrorSchemaMiddleware, handles_errors
from pipelines.feedback import FeedbackReceipt, FeedbackRequest, record_feedback, reviewer_of
from state import shared_db
from state.feedback import FeedbackStore
from pipelines.lifecycle import UpdateModelResponse, import_export_file, resolve_target, switch_model
from api.limits import BodyLimitMiddleware, RateLimitMiddleware
from api.metric_labels import EndpointLabels, service_routes
from pipelines.runner_slots import ModelSlot, segmentation_summary, tabular_summary
from api.mri_submit import SEQUENCE_FIELD, missing_sequences_check
from api.openapi import OpenAPIMiddleware
from api.phi import PatientId
from api.shutdown import (
    at_deadline,
    at_signal,
    fail_own_tasks,
    guard_worker_process,
    is_bentoml_worker,
    mark_arbiter,
    recover_after_crash,
)
from pipelines.shaping import (
    class_probabilities,
    describe_slice,
    elapsed_ms,
    modality_warnings,
    new_request_id,
    response_metadata,
)
from api.tasks import (
    TaskRoutesMiddleware,
    bentoml_result_store_path,
    cancel_task,
    configure_bentoml_result_store,
    current_task_id,
    in_turn,
    run_tracked,
    task_status,
)
from api.uploads import UploadGuardMiddleware, file_fields_by_path, task_inputs_by_path
from core.cards.classification import ClassificationCard
from core.cards.segmentation import SegmentationCard
from core.cards.tabular import TabularCard
from core.errors import InvalidRequest, NotFound
from core.priority import ROUTINE, Priority
from pipelines.priority_gate import PriorityGate
from core.schemas import (
    BiomarkerResponse,
    BiomarkerResult,
    BiomarkerXaiOptions,
    CTClassificationResponse,
    ExplainResponse,
    HealthResponse,
    ModelInfoResponse,
    MRISegmentationResponse,
    TaskStatusResponse,
)
from core.settings import get_settings
from state.tasks import split_ref
from state.request_cache import NOT_CACHED_WARNING
from state.stores import embedded_task_store, open_mri_queue, open_request_cache, open_task_store, prepare_job_queue
from monitoring.backlog import watch_backlog
from monitoring.live import live_figures, replica_samples
from state.pacs_jobs import Job, JobState, Notice, Notified
from postprocessing.masks import PostProcessingOptions
from preprocessing.dicom import quiet_pydicom
from runners.biomarker import ARRAY_METHODS as BIOMARKER_ARRAY_METHODS
from runners.biomarker import BiomarkerModel
from runners.common import ACCESS_LOG_OFF
from runners.ct import CTClassifier
from runners.mri import MRISegmenter
from xai.shap_plots import shap_explanation

log = logging.getLogger("neuronova")
settings = get_settings()
quiet_pydicom()
configure_bentoml_result_store(settings.data_dir)
bound_host = serving_host(sys.argv)
if is_bentoml_worker() or bound_host is not None:  # a server starting: refuse to start open
    check_start(settings.auth, bound_host)
if is_bentoml_worker():
    guard_worker_process(settings.shutdown_grace_seconds)
else:
    mark_arbiter()
    accept_balance.prepare_board()
ops = FastAPI(title="NeuroNova operations", openapi_url=None, docs_url=None, redoc_url=None)

GRAD_CAM = "grad_cam"
SHAP = "shap"
MRI_ROUTE = "/predict/mri_segmentation"


@bentoml.service(name="neuronova", workers=2, traffic={"timeout": 300}, logging=ACCESS_LOG_OFF)
@bentoml.asgi_app(ops, path="/")
class NeuroNova:
    """Brain-tumour AI for clinical decision support: CT classification, MRI segmentation, biomarkers."""

    ct_runner = bentoml.depends(CTClassifier)
    biomarker_runner = bentoml.depends(BiomarkerModel)
    mri_runner = bentoml.depends(MRISegmenter)

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.ct = ModelSlot("ct_classification", self.ct_runner, ClassificationCard, batched=batched_methods(CTClassifier))
        self.biomarker = ModelSlot("biomarker_prediction", self.biomarker_runner, TabularCard, tabular_summary,
                                   batched=batched_methods(BiomarkerModel), array_methods=BIOMARKER_ARRAY_METHODS)
        self.mri = ModelSlot("mri_segmentation", self.mri_runner, SegmentationCard, segmentation_summary)
        self.tasks = open_task_store(settings)
        self.queue = open_mri_queue(settings, self.tasks)
        if self.queue is not None:  # MRI tasks through the shared queue; a stopping worker hands its task back
            at_signal(self.queue.stop)
            at_deadline(self.queue.hand_back_running)
        else:
            at_deadline(lambda: fail_own_tasks(self.tasks))
            self.mri_slots = PriorityGate(settings.limits.mri_running_per_worker)  # the others wait, pending
        self.requests = open_request_cache(settings)
        self.feedback_store = FeedbackStore.from_settings(get_settings())
        self.pacs = self.pacs_background = None
        if settings.pacs.config:  # the PACS connection (pacs/): only where configured
            from pacs.runtime import Background, build_flow

            self.pacs = build_flow(settings, {s.model_id: s for s in (self.ct, self.mri)}, self.tasks)
            self.pacs_background = Background(self.pacs, settings.data_dir)

    @bentoml.on_deployment
    def recover() -> None:
        """Once per start, before the workers: what a killed server left behind (api/shutdown.py, state/pacs_jobs.py).
        Distributed, the tasks a killed replica held are taken over by the queue, not failed; the queue's tables are
        created once."""
        with shared_db.start_up():
            prepare_job_queue(settings)
            recover_after_crash(embedded_task_store(settings), bentoml_result_store_path())
            if settings.pacs.config:
                from pacs.runtime import recover

                recover(settings)

    async def __is_ready__(self) -> bool:
        """`/readyz` (besides BentoML's runner checks): replicas are unready while the shared database or volume
        cannot be used (probed in a thread at most every 2 s while nothing else has; `state.dependency_health`)."""
        return self.queue is None or await asyncio.to_thread(self.tasks.ready)

    def _needs_shared_state(self) -> None:
        """Replicas: `DependencyUnavailable` (503) at once while the shared database or volume is known unreachable."""
        if self.queue is not None:
            self.tasks.check_available()

    @bentoml.on_startup
    async def start_queue(self) -> None:
        """Distributed mode: this API worker takes queued MRI tasks (one at a time) from now on."""
        if self.queue is not None:
            await self.queue.start(self._run_queued)

    @bentoml.on_startup
    async def start_pacs(self) -> None:
        """Where configured, each API worker warms up what PACS jobs run (it is ready after that) and works the PACS
        job queue; one of them polls `/changes`."""
        if self.pacs_background is not None:
            await self.pacs_background.start()

    @bentoml.on_startup
    async def start_monitoring(self) -> None:
        """Each API worker publishes the MRI task backlog to /metrics (monitoring/backlog.py)."""
        self.backlog_watch = asyncio.create_task(watch_backlog(self.tasks))

    @bentoml.on_shutdown
    async def stop_monitoring(self) -> None:
        self.backlog_watch.cancel()

    @bentoml.on_shutdown
    async def stop_queue(self) -> None:
        if self.queue is not None:
            await self.queue.close()

    @bentoml.on_shutdown
    async def stop_pacs(self) -> None:
        if self.pacs_background is not None:
            await self.pacs_background.stop()

    async def _run_queued(self, ref: str, params: dict[str, Any]) -> None:
        """One attempt of a queued MRI task, by the same pipeline as an embedded task, its writes fenced by `ref`."""
        mri = await asyncio.to_thread(importlib.import_module, "pipelines.mri")
        request = mri.SegmentationRequest.from_queued(ref, params, self.queue.upload_paths(split_ref(ref)[0], params))
        attempt = mri.SegmentationAttempt(self.mri, self.tasks, request, settings.limits, self.requests,
                                          read=self.queue.read_upload)
        await run_tracked(self.tasks, ref, request.request_id, self.mri.model_id,
                          self.queue.guarded(attempt.response, ref), after_commit=attempt.remember)

    @bentoml.api(route="/predict/ct_classification")
    @handles_errors
    async def predict_ct_classification(
        self,
        image: Path,
        patient_id: PatientId,
        request_id: str | None = Field(default=None, max_length=128),
        xai: StrictBool = False,
        xai_methods: list[str] | str = Field(default_factory=lambda: [GRAD_CAM]),
        metadata: dict[str, Any] | None = None,
    ) -> CTClassificationResponse:
        """Classify one CT (or MR, as the model's card allows) slice; Grad-CAM (or, for a model without torch weights,
        occlusion sensitivity) on request; a warning when the input looks unlike the model's training data."""
        started = time.perf_counter()
        methods = requested_methods(xai_methods) if xai else []
        data = image.read_bytes()
        out = await classify_slice(self.ct, data, image.name, xai_methods=methods, max_pixels=settings.limits.max_image_pixels)
        card = out.model.card
        result = class_probabilities(out.probabilities, card.contract_labels())
        response = CTClassificationResponse(
            request_id=new_request_id(request_id), model_id=self.ct.model_id, model_version=out.model.tag,
            intended_use=card.intended_use, inference_time_ms=elapsed_ms(started), result=result,
            xai=explanations(out.model, out.heatmaps, out.prepared.display, result.predicted_class) or None,
            warnings=modality_warnings(out.decoded, card.input.modalities) + out.warnings,
            metadata=response_metadata(describe_slice(out.decoded, data), metadata),
        )
        owner = current_owner()
        if not await asyncio.to_thread(lambda: self.requests.remember(cached_classification(response, out), owner)):
            response.warnings.append(NOT_CACHED_WARNING)
        return response

    @bentoml.api(route="/predict/biomarker_prediction")
    @handles_errors
    async def predict_biomarker_prediction(
        self,
        biomarkers: dict[str, Any],
        patient_id: PatientId,
        request_id: str | None = Field(default=None, max_length=128),
        xai: StrictBool = False,
        xai_methods: list[Literal["shap"]] = Field(default_factory=lambda: [SHAP]),
        xai_options: BiomarkerXaiOptions = Field(default_factory=BiomarkerXaiOptions),
    ) -> BiomarkerResponse:
        """Tumour type, metastasis organ and stage from biomarkers checked against the model's schema; TreeSHAP on request."""
        started = time.perf_counter()
        explain = xai and SHAP in xai_methods
        predicted = await predict_record(self.biomarker, biomarkers, explain=explain)
        model, record, heads = predicted.model, predicted.record, predicted.heads
        card = model.card
        return BiomarkerResponse(
            request_id=new_request_id(request_id), model_id=self.biomarker.model_id, model_version=model.tag,
            intended_use=card.intended_use, inference_time_ms=elapsed_ms(started),
            result=BiomarkerResult.from_heads({n: class_probabilities(h.probabilities, h.classes) for n, h in heads.items()}),
            xai={SHAP: shap_explanation(heads, record.values, card.feature_names(), xai_options.shap.plots)}
            if explain else None,
            warnings=[f"{name} was not given: the model treated it as missing" for name in record.missing],
            metadata=response_metadata(),
        )

    @bentoml.api(route="/xai/explain")
    @handles_errors
    async def xai_explain(
        self,
        request_id: str = Field(min_length=1, max_length=128),
        model_id: Literal["ct_classification"] = "ct_classification",
        xai_methods: list[Literal["grad_cam", "occlusion"]] = Field(default_factory=lambda: [GRAD_CAM]),
        options: ExplainOptions = Field(default_factory=ExplainOptions),
    ) -> ExplainResponse:
        """Grad-CAM or occlusion maps for an earlier CT prediction of the same token subject, from the bounded,
        expiring cache of prepared inputs."""
        cached = self.requests.get(request_id, current_owner())
        model = await self.ct.loaded()
        return await explain_cached(self.ct, model, cached, xai_methods, options)

    @bentoml.api(route="/feedback", input_spec=FeedbackRequest)
    @handles_errors
    async def feedback(self, **review: Any) -> FeedbackReceipt:
        """A doctor accepts, corrects (a CT label, an MRI mask) or rejects an earlier result of the same token
        subject; stored durably for fine-tuning (in a thread: an MRI input is tens of MB to load and compress). The
        reviewer is the token's subject where auth is on."""
        self._needs_shared_state()
        reviewer = current_subject()
        verdict = FeedbackRequest(**{**review, **({"reviewer_id": reviewer_of(reviewer)} if reviewer else {})})
        return await asyncio.to_thread(lambda: record_feedback(self.feedback_store, verdict,
                                                               self.requests.get(verdict.request_id, current_owner())))

    @bentoml.api(route="/update_model")
    @handles_errors
    async def update_model(
        self,
        model_id: str,
        version: str | None = None,
        rollback: StrictBool = False,
        model_file: Path = None,  # type: ignore[assignment] - `Path | None` and Optional[Path] break uploads (G19)
        sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$"),
    ) -> UpdateModelResponse:
        """Admin: switch a model to another store version, or an uploaded export (with sha256), or roll back."""
        self._needs_shared_state()
        slot = {s.model_id: s for s in self._slots()}.get(model_id)
        if slot is None:
            raise InvalidRequest("unknown model_id", {"known": [s.model_id for s in self._slots()]})
        described = await slot.describe()
        if "generation" not in described:
            raise InvalidRequest(f"{model_id} does not support hot switching")
        old_tag = described.get("tag") or "none"
        if model_file is not None:
            if sha256 is None:
                raise InvalidRequest("a model_file needs its sha256")
            version = await asyncio.to_thread(import_export_file, model_file, sha256, settings.limits, slot)
        return await switch_model(slot, resolve_target(slot, old_tag, version, rollback), old_tag)

    @bentoml.task(route=MRI_ROUTE)
    async def predict_mri_segmentation(
        self,
        image: Annotated[list[Path], Field(min_length=1)],
        patient_id: PatientId,
        request_id: str | None = Field(default=None, max_length=128),
        sequence_type: list[str] | str | None = None,
        xai: StrictBool = False,
        post_processing: PostProcessingOptions = Field(default_factory=PostProcessingOptions),
        uncertainty: StrictBool = False,
        priority: Priority = ROUTINE,
        ctx: bentoml.Context = None,
    ) -> MRISegmentationResponse:
        """Segment a brain tumour in MRI (NIfTI, DICOM file or series zip, or one file per sequence): submit, poll. An
        `urgent` task starts before every routine one still waiting (docs/scale-out.md, "Priority").

        The MRI pipeline (torch, MONAI, nibabel, highdicom) is imported by the first MRI task, not at start-up: an API
        worker that serves CT and biomarkers only stays small; in a thread, so that seconds of importing never stall the
        event loop (and the other requests and runner connections it serves)."""
        mri = await asyncio.to_thread(importlib.import_module, "pipelines.mri")

        request = mri.SegmentationRequest(
            task_id=current_task_id(ctx), request_id=new_request_id(request_id), images=image, owner=current_owner(),
            sequence_type=sequence_type, xai=xai, post_processing=post_processing, uncertainty=uncertainty,
            patient_id=patient_id,
        )
        if self.queue is not None:  # distributed: whichever replica's worker is free runs it
            await self.queue.accept(request.task_id, request.request_id, self.mri.model_id, list(image),
                                    request.queued_params(), priority)
            return JSONResponse({"task_id": request.task_id, "status": "pending"}, status_code=202)
        attempt = mri.SegmentationAttempt(self.mri, self.tasks, request, settings.limits, self.requests)
        return await run_tracked(self.tasks, request.task_id, request.request_id, self.mri.model_id,
                                 lambda: in_turn(self.mri_slots, priority, attempt.response), ctx,
                                 after_commit=attempt.remember)

    @ops.get("/task/{task_id}", response_model=TaskStatusResponse)
    @ops.get("/predict/task_status/{task_id}", response_model=TaskStatusResponse)
    @handles_errors
    async def get_task(self, task_id: str) -> JSONResponse:
        """The original design's polling route: status, progress, current step, result or error (the submitter's
        only: another subject is told the task does not exist)."""
        return await asyncio.to_thread(task_status, self.tasks, task_id, current_owner())

    @ops.delete("/task/{task_id}", response_model=TaskStatusResponse)
    @handles_errors
    async def delete_task(self, task_id: str) -> JSONResponse:
        """Cancel a task (the submitter's): it is marked cancelled at once and its work stops at the next window
        batch."""
        return await asyncio.to_thread(cancel_task, self.tasks, task_id, current_owner())

    @ops.post("/pacs/notify", response_model=Notified, status_code=202)
    @handles_errors
    async def pacs_notify(self, notice: Notice) -> JSONResponse:
        """A study became stable in the PACS (Orthanc's Lua `OnStableStudy`): queued for a worker to select series
        and queue a job per model (idempotent); answers at once. Admin JWT or the configured PACS token."""
        from pacs.runtime import notified

        body = await notified(self._pacs(), notice)
        return JSONResponse(body.model_dump(mode="json"), status_code=202)

    @ops.get("/pacs/jobs", response_model=list[Job])
    @handles_errors
    async def pacs_jobs(self, study_instance_uid: str | None = None, state: JobState | None = None,
                        limit: int = Query(default=100, ge=1, le=1000)) -> JSONResponse:
        """Operators: the newest PACS jobs, optionally of one study or in one state."""
        jobs = await asyncio.to_thread(self._pacs().jobs.list, study_instance_uid, state, limit)
        return JSONResponse([job.model_dump(mode="json") for job in jobs])

    @ops.get("/pacs/jobs/{job_id}", response_model=Job)
    @handles_errors
    async def pacs_job(self, job_id: str) -> JSONResponse:
        """Operators: one PACS job, with its log."""
        from pacs.runtime import job_of

        return JSONResponse((await job_of(self._pacs(), job_id)).model_dump(mode="json"))

    @ops.get("/health", response_model=HealthResponse,
             responses={503: {"model": HealthResponse, "description": "A model failed to load (degraded)"}})
    async def health(self) -> JSONResponse:
        """Liveness of every model: 200 healthy, or 503 degraded naming the model that failed to load (or that was
        switched to a version this replica could not load yet). Replicas: a shared dependency that cannot be used
        (`dependencies`) makes it degraded too, answered 200: CT and biomarkers still work."""
        statuses = {slot.model_id: await slot.status() for slot in self._slots()}
        gpus = (await self.ct.describe()).get("gpu_devices", [])
        models_ok = all(s.loaded and not s.switch_pending for s in statuses.values())
        dependencies = {} if self.queue is None else await asyncio.to_thread(self.tasks.dependencies)
        body = HealthResponse(
            status="healthy" if models_ok and set(dependencies.values()) <= {"ok"} else "degraded",
            dependencies=dependencies,
            version=settings.version,
            models=statuses,
            gpu_available=bool(gpus),
            gpu_devices=gpus,
            memory_usage_mb=round(_server_rss_mb(), 1),
            uptime_seconds=round(time.monotonic() - self.started, 1),
        )
        return JSONResponse(body.model_dump(mode="json"), status_code=200 if models_ok else 503)

    @ops.get("/model_info")
    @handles_errors
    async def model_info(self) -> ModelInfoResponse:
        """Every loaded model's card, held-out metrics, size and inference time, and how it does live: answers, OOD
        rate and drift on this replica, clinicians' verdicts from the feedback store (in a thread: a database read)."""
        infos = [info for info in [await slot.info() for slot in self._slots()] if info is not None]
        samples = await asyncio.to_thread(replica_samples)  # one read of the metrics files for every model
        for info in infos:
            info.live = await asyncio.to_thread(live_figures, info.model_id, info.version, self.feedback_store, samples)
        return ModelInfoResponse(models=infos)

    def _slots(self) -> list[ModelSlot]:
        return [self.ct, self.biomarker, self.mri]

    def _pacs(self) -> Any:
        if self.pacs is None:
            raise NotFound("the PACS connection is not configured (set NEURONOVA_PACS__CONFIG)")
        return self.pacs


def _server_rss_mb() -> float:
    """Resident memory of the whole server: this worker's process tree from the BentoML arbiter down."""
    me = psutil.Process(os.getpid())
    root = me.parent() if me.parent() is not None and "bentoml" in " ".join(me.parent().cmdline()) else me
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


# Outermost first (BentoML stacks them in the order added): the JSON access log line; /docs.json completed with
# what the routes really answer (api/openapi.py); every error in the SPEC
# schema; who is calling; how often; how much they send; uploads that must be uploads (not URLs) with an anonymised patient id,
# MRI submissions valid for the route's input model (BentoML validates a task only after answering it) and studies that
# name their sequences and lack one the served model requires; then the MRI task routes' own handling (which drops
# the token before BentoML stores the request).
routes = service_routes(ops.routes, NeuroNova.apis.values())
NeuroNova.add_asgi_middleware(AccessLogMiddleware, route_label=EndpointLabels(routes))
NeuroNova.add_asgi_middleware(OpenAPIMiddleware, apis=NeuroNova.apis)
NeuroNova.add_asgi_middleware(ErrorSchemaMiddleware)
NeuroNova.add_asgi_middleware(JWTAuthMiddleware, auth=settings.auth,
                              path_tokens=importlib.import_module("pacs.runtime").notify_tokens(settings)
                              if settings.pacs.config else None)
NeuroNova.add_asgi_middleware(RateLimitMiddleware, rate_limit=settings.rate_limit, exempt_paths=PUBLIC_PATHS,
                              database_url=settings.distributed.database_url)
NeuroNova.add_asgi_middleware(BodyLimitMiddleware, limits=settings.limits)
MRI_FIELD_CHECKS = {SEQUENCE_FIELD: missing_sequences_check(lambda: bentoml.get_current_service().mri)}
NeuroNova.add_asgi_middleware(UploadGuardMiddleware, file_fields=file_fields_by_path(NeuroNova.apis),
                              field_checks={MRI_ROUTE: MRI_FIELD_CHECKS, f"{MRI_ROUTE}/submit": MRI_FIELD_CHECKS},
                              validated=task_inputs_by_path(NeuroNova.apis))
NeuroNova.add_asgi_middleware(TaskRoutesMiddleware, task_routes=(MRI_ROUTE,), settings=settings)
# Every process of the server imports this module: BentoML's internals are patched here, once, on the pinned version
# only (api/bentoml_patches.py, docs/bentoml-pitfalls.md "Patches").
bentoml_patches.install(routes)
