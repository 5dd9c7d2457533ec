"""The NeuroNova calls a Django site makes, through BentoML's `SyncHTTPClient`.

- CT classification, biomarker prediction and a doctor's verdict (`POST /feedback`): the client's generated methods.
- MRI segmentation is a BentoML task. `SyncHTTPClient.<task>.submit()` raises in BentoML 1.4.40 *after* the server
  has started the task (`_opened_files` missing in its `finally:` block, docs/bentoml-pitfalls.md G3), which would orphan the job. So
  `submit_mri` posts to the task's `/submit` route through the same client's `request()` and reads the task id from
  the answer; jobs are then polled out of request threads (`manage.py neuronova_poll`) on the service's durable
  `GET /task/<id>` route, which survives a restart of the service (BentoML's own task store does not, docs/bentoml-pitfalls.md G4).

Every call carries a short-lived HS256 token minted here for the calling user, has a timeout, and is retried
with backoff only where that cannot repeat work (see `retry.py`). Errors become `errors.ServiceError`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, TypeVar

import bentoml
import httpx
import jwt
from bentoml.exceptions import BentoMLException
from django.core.signals import setting_changed
from django.dispatch import receiver

from neuronova_client.conf import ClientSettings, client_settings
from neuronova_client.errors import ServiceError
from neuronova_client.retry import RetryPolicy, call_with_retries

MRI_ROUTE = "/predict/mri_segmentation"
SERVICE_SUBJECT = "neuronova-django"
T = TypeVar("T")


class _Connection:
    """One thread's `SyncHTTPClient` (httpx clients are not shared across threads here), remembering the
    `Retry-After` of the last answer, which BentoML's exceptions drop."""

    def __init__(self, config: ClientSettings, token: str) -> None:
        try:
            self.bento = bentoml.SyncHTTPClient(config.url, token=token, timeout=config.timeout_seconds,
                                                server_ready_timeout=0)
        except BentoMLException as exc:  # it fetches /schema.json; its error keeps no status: ask once more
            probe = httpx.get(f"{config.url.rstrip('/')}/schema.json", headers=_bearer(token),
                              timeout=config.connect_timeout_seconds)
            if probe.is_error:
                raise ServiceError.from_response(probe.status_code, probe.text,
                                                 probe.headers.get("retry-after")) from exc
            raise ServiceError(502, "INTERNAL_SERVER_ERROR", str(exc)) from exc
        self.http: httpx.Client = self.bento.client
        self.http.timeout = httpx.Timeout(config.timeout_seconds, connect=config.connect_timeout_seconds)
        self.http.event_hooks["response"].append(self._remember)
        self.retry_after: str | None = None

    def _remember(self, response: httpx.Response) -> None:
        self.retry_after = response.headers.get("retry-after")

    def error(self, exc: BentoMLException) -> ServiceError:
        """A BentoML client exception (its message is the answer's body) as our typed error."""
        return ServiceError.from_response(int(exc.error_code), exc.message, self.retry_after)


class NeuroNovaClient:
    """CT, biomarker and MRI calls for a Django site; `subject` names the user in the token (rate limits, audit)."""

    def __init__(self, config: ClientSettings) -> None:
        self.config = config
        self.policy = RetryPolicy(config.retries, config.backoff_seconds, config.backoff_max_seconds)
        self._local = threading.local()

    def token(self, subject: str) -> str:
        """A short-lived HS256 token with the claims the service checks (exp, role, and aud/iss when configured)."""
        now = int(time.time())
        claims: dict[str, Any] = {"sub": subject, self.config.role_claim: self.config.jwt_role, "iat": now,
                                  "exp": now + self.config.token_ttl_seconds}
        if self.config.jwt_audience:
            claims["aud"] = self.config.jwt_audience
        if self.config.jwt_issuer:
            claims["iss"] = self.config.jwt_issuer
        return jwt.encode(claims, self.config.jwt_secret, algorithm="HS256")

    def classify_ct(self, image: IO[bytes], patient_id: str, *, subject: str, xai: bool = False,
                    request_id: str | None = None) -> dict[str, Any]:
        """`POST /predict/ct_classification` with one uploaded slice (DICOM, PNG or JPEG)."""
        with tempfile.TemporaryDirectory(prefix="neuronova-") as folder:
            path = Path(folder) / _filename(image)  # BentoML's client uploads files from paths
            image.seek(0)
            with path.open("wb") as copy:
                shutil.copyfileobj(image, copy)
            return self._api("predict_ct_classification", subject, image=path, patient_id=patient_id, xai=xai,
                             **_given(request_id=request_id))

    def predict_biomarkers(self, biomarkers: dict[str, Any], patient_id: str, *, subject: str, xai: bool = False,
                           request_id: str | None = None) -> dict[str, Any]:
        """`POST /predict/biomarker_prediction` with the model's features (nested as in SPEC.md)."""
        return self._api("predict_biomarker_prediction", subject, biomarkers=biomarkers, patient_id=patient_id,
                         xai=xai, **_given(request_id=request_id))

    def submit_mri(self, images: Sequence[IO[bytes]], patient_id: str, *, subject: str, request_id: str,
                   xai: bool = False, sequence_type: str | list[str] | None = None) -> str:
        """Start an MRI segmentation task; returns its task id at once (the docs/bentoml-pitfalls.md G3 workaround: see the module doc)."""
        form = {"patient_id": patient_id, "request_id": request_id, "xai": xai,
                **_given(sequence_type=sequence_type)}
        data = {key: value if isinstance(value, str) else json.dumps(value) for key, value in form.items()}

        def send(connection: _Connection) -> httpx.Response:
            files = []
            for image in images:
                image.seek(0)  # a retried attempt sends the whole file again
                files.append(("image", (_filename(image), image, "application/octet-stream")))
            return connection.bento.request("POST", f"{MRI_ROUTE}/submit", files=files, data=data,
                                            headers=_bearer(self.token(subject)))

        body = self._request(send, idempotent=False)
        task_id = body.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            raise ServiceError(502, "INTERNAL_SERVER_ERROR", f"task submit answered without a task id: {body!r}")
        return task_id

    def submit_feedback(self, request_id: str, verdict: str, *, reviewer_id: str, subject: str,
                        corrected_label: str | None = None, comment: str = "") -> dict[str, Any]:
        """`POST /feedback`: a doctor's verdict on an earlier result; returns the service's receipt (`feedback_id`,
        `model_version`, `input_sha256`). Each call is a new record, so it is retried only where the service cannot
        have recorded it (connection refused, a 429 or 503 refusal), never after a timeout."""
        return self._api("feedback", subject, request_id=request_id, verdict=verdict, reviewer_id=reviewer_id,
                         comment=comment, **_given(corrected_label=corrected_label))

    def task_status(self, task_id: str, *, subject: str) -> dict[str, Any]:
        """`GET /task/<id>`: status, progress, current step, and the result (or SPEC error) once finished."""
        return self._request(lambda connection: connection.bento.request(
            "GET", f"/task/{task_id}", headers=_bearer(self.token(subject))), idempotent=True)

    def close(self) -> None:
        """Close this thread's connection (the next call opens a new one)."""
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.bento.close()
            self._local.connection = None

    def _connection(self) -> _Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = _Connection(self.config, self.token(SERVICE_SUBJECT))
        return connection

    def _api(self, name: str, subject: str, **inputs: Any) -> dict[str, Any]:
        """Call a generated method of `SyncHTTPClient` (not idempotent: retried only when safe)."""
        def once() -> dict[str, Any]:
            connection = self._connection()
            connection.http.headers.update(_bearer(self.token(subject)))
            try:
                return getattr(connection.bento, name)(**inputs)
            except BentoMLException as exc:
                raise connection.error(exc) from None
        return call_with_retries(once, self.policy, idempotent=False)

    def _request(self, send: Callable[[_Connection], httpx.Response], *, idempotent: bool) -> dict[str, Any]:
        """Send a raw request through the client; an error answer becomes a `ServiceError`."""
        def once() -> dict[str, Any]:
            response = send(self._connection())
            if response.is_error:
                raise ServiceError.from_response(response.status_code, response.text,
                                                 response.headers.get("retry-after"))
            return response.json()
        return call_with_retries(once, self.policy, idempotent=idempotent)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _filename(upload: IO[bytes]) -> str:
    """The upload's own base name (Django keeps the client's file name; the service reads the extension)."""
    return Path(str(getattr(upload, "name", "") or "upload")).name or "upload"


def _given(**values: Any) -> dict[str, Any]:
    """The optional inputs that were given."""
    return {key: value for key, value in values.items() if value is not None}


@lru_cache(maxsize=1)
def get_client() -> NeuroNovaClient:
    """The process's client, built from `settings.NEURONOVA`."""
    return NeuroNovaClient(client_settings())


@receiver(setting_changed)
def _settings_changed(setting: str, **_: Any) -> None:
    if setting == "NEURONOVA":
        get_client.cache_clear()
