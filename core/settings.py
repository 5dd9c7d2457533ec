"""The one settings object, read from `NEURONOVA_*` environment variables at start-up.

Nested fields use a double underscore: `NEURONOVA_AUTH__ENABLED=false`, `NEURONOVA_CT__MODEL_TAG=neuronova-ct:abc`.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class AuthSettings(BaseModel):
    """JWT verification for tokens issued by the Django backend."""

    enabled: bool = True
    secret: str = ""
    algorithms: list[str] = ["HS256"]
    public_key: str = ""
    audience: str | None = None
    issuer: str | None = None
    role_claim: str = "role"
    admin_role: str = "admin"
    leeway_seconds: int = 10
    owner_claim: str = Field(default="sub", description=(
        "the token claim whose value owns a request's cached input and result (only requests with the same value may "
        "explain or review it); a shared claim such as a department lets colleagues review each other's requests"))
    allow_unauthenticated_network: bool = Field(default=False, description=(
        "with auth off, serve on an address other than loopback anyway (anyone who reaches it may switch models and "
        "read results); refused at start without it"))
    metrics_token: str = Field(default="", description=(
        "when set, /metrics answers only this bearer token (Prometheus: `authorization.credentials_file`) or an admin "
        "JWT; unset, /metrics is public and belongs on an internal network only"))


class RateLimitSettings(BaseModel):
    """Requests per minute per client (token subject, else address); 0 disables a limit."""

    enabled: bool = True
    default_per_minute: int = 100
    per_route_per_minute: dict[str, int] = {"/predict/ct_classification": 600}


class LimitSettings(BaseModel):
    """Upload and decoding limits; every one is checked before the expensive work it guards."""

    ct_max_bytes: int = 50 * 2**20
    mri_max_bytes: int = 100 * 2**20
    json_max_bytes: int = 1 * 2**20
    model_upload_max_bytes: int = Field(default=2 * 2**30, description=(
        "an exported model uploaded to /update_model (streamed to disk, never held in memory)"))
    model_unpacked_max_bytes: int = Field(default=8 * 2**30, description=(
        "what an uploaded export may unpack to; it may also expand at most archive_max_compression_ratio times"))
    max_image_pixels: int = 64 * 2**20
    max_volume_voxels: int = 64 * 2**20
    archive_max_files: int = 2000
    archive_max_uncompressed_bytes: int = Field(default=256 * 2**20, description=(
        "what a zipped study may expand to: max_volume_voxels (64 Mi) at 16 bits is 128 MiB of pixels (a whole "
        "4-sequence 1 mm brain study is ~70 MiB), so 256 MiB leaves room for 32-bit pixels or headers, not more"))
    archive_max_compression_ratio: float = Field(default=100.0, description=(
        "refuse an archive that expands more than this (studies deflate 2-7x; a bomb of zeros ~1000x)"))
    task_step_budget_seconds: dict[str, float] = Field(
        default_factory=lambda: {"decoding": 60.0, "preprocessing": 120.0, "inference": 900.0,
                                 "explaining": 900.0, "postprocessing": 120.0},
        description="wall-clock budget of each MRI task step; past it the task fails (INTERNAL_SERVER_ERROR, "
                    "details.reason step_budget_exceeded)")
    mri_running_per_worker: int = Field(default=1, ge=1, description=(
        "one machine: MRI tasks an API worker runs at once (each holds its decoded volumes: hundreds of MB for a "
        "BraTS-size study); the others wait in the queue, `pending`"))
    mri_queue_max: int = Field(default=16, ge=1, description=(
        "one machine: unfinished MRI tasks (running and waiting) beyond which a submission is refused with 429 "
        "and Retry-After"))


class FeedbackSettings(BaseModel):
    """Where doctors' feedback is stored."""

    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL, e.g. postgresql://user:password@host:5432/neuronova; "
        "unset: SQLite file <data_dir>/feedback/feedback.sqlite3 with inputs as files beside it")


class DistributedSettings(BaseModel):
    """Replicas behind a load balancer (docs/scale-out.md). Unset: one machine, SQLite and the local data directory."""

    database_url: str | None = Field(default=None, description=(
        "PostgreSQL URL (postgresql://user:password@host:5432/neuronova) holding task state, the MRI work queue, the "
        "active-model registry and the rate-limit counters, shared by every replica; unset: embedded (one machine)"))
    shared_dir: str | None = Field(default=None, description=(
        "a volume every replica mounts (ReadWriteMany): uploaded studies, task results, the explain/feedback cache "
        "and uploaded model exports, as write-once files (never a database); required with database_url"))
    replica_id: str | None = Field(default=None, description="this replica's name in logs and task leases "
                                   "(default: host name and process id)")

    @property
    def enabled(self) -> bool:
        return self.database_url is not None


class PacsSettings(BaseModel):
    """The PACS connection (pacs/, README "Connect your PACS"). Unset: nothing of it runs."""

    config: str | None = Field(default=None, description=(
        "path of the PACS YAML (DICOMweb source and destination, series rules per model, AE title, optional "
        "/changes polling); set, the API workers run the PACS job queue and serve /pacs/*"))


class DeidentificationSettings(BaseModel):
    """The DICOM PS3.15 Basic Application Level Confidentiality Profile (with the Retain UIDs Option, always) applied
    to the DICOM the API returns: the MRI route's SEG, whose PatientID is then the request's `patient_id`
    (`postprocessing/deidentification.py`). Results written into a PACS keep the study's identity."""

    retain_dates: bool = Field(default=False, description=(
        "the Retain Longitudinal Temporal Information with Full Dates Option: keep the source's study dates and times "
        "in the SEG; off, its StudyDate and StudyTime are empty"))


class ModelSlot(BaseModel):
    """Which model-store tag a runner loads at start-up, and the ONNX Runtime threads of its CPU engine."""

    model_tag: str
    intra_op_threads: int = Field(default=0, ge=0, description="0: one per physical core (ONNX Runtime's default)")


class ClassifierSlot(ModelSlot):
    """The CT slot: one ONNX Runtime thread by default. A slice costs the demo model ~1.2 ms: a second thread gives
    little and takes a core from the API workers (set NEURONOVA_CT__INTRA_OP_THREADS=0 for a heavy imported model)."""

    intra_op_threads: int = Field(default=1, ge=0, description="0: one per physical core (ONNX Runtime's default)")
    max_batch_size: int | None = Field(
        default=None, ge=1, description="slices per model call; unset: 32 on a host with an NVIDIA GPU, 8 on a CPU host "
        "(there a slice costs the same alone or in a batch, and ONNX Runtime's memory arena grows with the largest batch: "
        "~450 MB of RSS at 32, ~200 MB at 8 for the demo model)")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NEURONOVA_", env_nested_delimiter="__", extra="ignore")

    version: str = "0.1.0"
    patient_id_pattern: str = Field(
        default=r"^[A-Za-z0-9_.-]{1,64}$",
        description="what an anonymised patient id looks like (Python regex); names, whitespace and dates are refused "
                    "whatever it says (api/phi.py)",
    )
    auth: AuthSettings = AuthSettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
    limits: LimitSettings = LimitSettings()
    ct: ClassifierSlot = ClassifierSlot(model_tag="neuronova-ct:latest")
    mri: ModelSlot = ModelSlot(model_tag="neuronova-mri:latest")
    biomarker: ModelSlot = ModelSlot(model_tag="neuronova-biomarker:latest")
    feedback: FeedbackSettings = FeedbackSettings()
    distributed: DistributedSettings = DistributedSettings()
    pacs: PacsSettings = PacsSettings()
    deidentification: DeidentificationSettings = DeidentificationSettings()
    batch_max_latency_ms: int = Field(default=10_000, description="adaptive batching queue limit (BentoML sheds past it)")
    ct_adaptive_batching: bool = Field(default=True, description="false serves each CT request alone (for comparison)")
    occlusion_steps: int = Field(default=7, ge=2, le=16, description="occlusion grid per side: steps² extra forward "
                                 "passes per explained image (lower it for heavy models; docs/performance.md)")
    xai_cache_entries: int = 256
    xai_cache_ttl_seconds: int = 3600
    xai_cache_max_bytes: int = Field(default=4 * 2**30, description="disk bound of the request cache (an MRI entry "
                                     "is tens of MB: state/request_cache.py)")
    data_dir: str = "var"
    shutdown_grace_seconds: float = Field(default=15.0, ge=0, description=(
        "after SIGTERM each worker finishes in-flight work for this long, then fails the MRI tasks left and exits "
        "(well inside Kubernetes' 30 s terminationGracePeriodSeconds)"))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings read once per process."""
    return Settings()
