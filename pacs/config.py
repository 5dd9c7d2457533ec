"""The PACS connection's one YAML file: where studies come from and results go (DICOMweb), which series each model
takes (`pacs.selection` rules), our AE title, how often to poll Orthanc's `/changes`, how export retries.

Secrets are never in the file: an endpoint names the environment variables holding its credentials, and sends them
only over https (or to loopback) unless the endpoint says `allow_plain_http: true` (a private network).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pacs.selection import ModelRules


class EndpointAuth(BaseModel):
    """HTTP Basic (`username_env`, `password_env`) or a bearer token (`token_env`), read from the environment."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["basic", "bearer"]
    username_env: str | None = None
    password_env: str | None = None
    token_env: str | None = None

    @model_validator(mode="after")
    def _names_its_variables(self) -> EndpointAuth:
        needed = ("username_env", "password_env") if self.kind == "basic" else ("token_env",)
        missing = [name for name in needed if not getattr(self, name)]
        if missing:
            raise ValueError(f"{self.kind} auth needs {', '.join(missing)}")
        return self

    def headers(self) -> dict[str, str]:
        """The Authorization header, from the named environment variables (KeyError naming an unset one)."""
        import base64

        if self.kind == "bearer":
            return {"Authorization": f"Bearer {_env(self.token_env)}"}
        pair = f"{_env(self.username_env)}:{_env(self.password_env)}".encode()
        return {"Authorization": f"Basic {base64.b64encode(pair).decode()}"}


def refuse_plain_credentials(url: str, auth: EndpointAuth | None, allow_plain_http: bool) -> None:
    """ValueError when credentials would cross the network unencrypted: auth over `http://` to a host other than
    loopback, unless `allow_plain_http` says the network is private (e.g. the Compose stack's)."""
    parsed = urlsplit(url)
    if auth is None or parsed.scheme != "http" or allow_plain_http:
        return
    if parsed.hostname in ("localhost", "::1") or (parsed.hostname or "").startswith("127."):
        return
    raise ValueError(f"{auth.kind} credentials over plain http to {parsed.hostname}: use https, or set "
                     "allow_plain_http: true for a private network")


def _env(name: str | None) -> str:
    value = os.environ.get(name or "")
    if not value:
        raise KeyError(f"environment variable {name} is not set")
    return value


class DicomWebEndpoint(BaseModel):
    """A DICOMweb service root (QIDO-RS, WADO-RS and STOW-RS below it), e.g. `http://orthanc:8042/dicom-web`."""

    model_config = ConfigDict(extra="forbid")

    url: str
    auth: EndpointAuth | None = None
    timeout_seconds: float = 30.0
    allow_plain_http: bool = Field(default=False, description=(
        "send `auth` over http:// to a host other than loopback (a private network only, e.g. the Compose stack)"))

    @model_validator(mode="after")
    def _credentials_over_tls(self) -> DicomWebEndpoint:
        refuse_plain_credentials(self.url, self.auth, self.allow_plain_http)
        return self

    def headers(self) -> dict[str, str]:
        return self.auth.headers() if self.auth is not None else {}


class ChangesPolling(BaseModel):
    """Poll an Orthanc's REST `/changes` for `StableStudy` (a PACS that cannot be scripted with Lua)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="Orthanc's REST root, e.g. http://orthanc:8042")
    auth: EndpointAuth | None = None
    interval_seconds: float = Field(default=5.0, gt=0)
    allow_plain_http: bool = Field(default=False, description="as for `DicomWebEndpoint`")

    @model_validator(mode="after")
    def _credentials_over_tls(self) -> ChangesPolling:
        refuse_plain_credentials(self.url, self.auth, self.allow_plain_http)
        return self


class ExportRetry(BaseModel):
    """Backoff while the destination is unreachable: initial, doubled per failure up to max; nothing is dropped."""

    model_config = ConfigDict(extra="forbid")

    initial_seconds: float = Field(default=2.0, gt=0)
    max_seconds: float = Field(default=300.0, gt=0)

    def delay(self, failures: int) -> float:
        return min(self.max_seconds, self.initial_seconds * 2 ** max(failures - 1, 0))


class RetrievalLimits(BaseModel):
    """How much of one series a job may retrieve: a study whose series passes either is failed, not retrieved whole
    (the instance count from the QIDO-RS search is checked before, the bytes while the instances arrive)."""

    model_config = ConfigDict(extra="forbid")

    max_instances_per_series: int = Field(default=2000, gt=0, description="a thin-slice CT is ~1000 instances")
    max_bytes_per_series: int = Field(default=1 * 2**30, gt=0, description="pixel data of one series")


class PacsConfig(BaseModel):
    """Everything the PACS connection needs (one YAML file, `NEURONOVA_PACS__CONFIG`)."""

    model_config = ConfigDict(extra="forbid")

    ae_title: str = Field(default="NEURONOVA", pattern=r"^[ -~]{1,16}$")
    source: DicomWebEndpoint
    destination: DicomWebEndpoint | None = Field(default=None, description="where results go; unset: the source")
    models: list[ModelRules] = Field(min_length=1)
    notify_token_env: str | None = Field(default=None, description=(
        "environment variable holding a static bearer token that POST /pacs/notify accepts besides an admin JWT "
        "(what the PACS's Lua script sends)"))
    changes: ChangesPolling | None = None
    export_retry: ExportRetry = Field(default_factory=ExportRetry)
    poll_seconds: float = Field(default=0.5, gt=0, description="how often an idle worker looks for queued jobs")
    retrieval: RetrievalLimits = Field(default_factory=RetrievalLimits)

    def rules_for(self, model_id: str) -> ModelRules:
        """The first rules naming `model_id` (KeyError when none does)."""
        for rules in self.models:
            if rules.model_id == model_id:
                return rules
        raise KeyError(model_id)

    @property
    def store_to(self) -> DicomWebEndpoint:
        return self.destination or self.source

    def notify_token(self) -> str | None:
        return os.environ.get(self.notify_token_env) or None if self.notify_token_env else None


def load_config(path: str | Path) -> PacsConfig:
    """The validated configuration in `path` (YAML)."""
    return PacsConfig.model_validate(yaml.safe_load(Path(path).read_text(encoding="utf-8")))
