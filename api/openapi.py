"""The OpenAPI document at `/docs.json` says what the service really answers (schemathesis checks every response
against it, `tests/http/test_schemathesis_http.py`). BentoML generates it from the API methods and the mounted
FastAPI routes; this completes it:

- the version is OpenAPI 3.1: BentoML writes "3.0.2", but its schemas are pydantic's JSON Schema 2020-12 (`anyOf`
  with `{"type": "null"}` for an optional field, numeric `exclusiveMinimum`), which is 3.1's dialect; read as 3.0, a
  `null` the service rightly answers (`"xai": null`) broke its own schema;
- each API method's request and response bodies are its models' own JSON schemas: BentoML inlines them into the
  paths flattened to their first type, so an optional field lost its `null` (`"xai": null`, `"request_id": null`)
  and a `list[str] | str` field its string form (file fields: `type: string, format: binary`);
- every error a route can answer is declared with the SPEC.md error body (`ErrorResponse`, `core.errors`): BentoML
  declares 400/404/500 as `{"error": str}` and FastAPI 422 as its own validation body, which `api.errors` rewrites;
  401 where a token is required, 403 on admin routes, 409 for a cancelled task's result; the probes, `/health` and
  `/metrics` keep their own declarations (their bodies are their own: `api.errors.UNTOUCHED_PATHS`);
- the MRI task routes: the base route answers 202 and `/submit` and `/retry` 200 with `{task_id, status}`
  (`TaskSubmitted`; BentoML declares the segmentation and a status body); `…/status` declares BentoML's real status
  values (BentoML's own schema lists others), and the design's task body (`/task/{id}`, `…/cancel`) is ours: BentoML's
  status schema had taken its name (`TaskStatusResponse`) in the merged components.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import ADMIN_PATHS, ADMIN_PREFIXES, PUBLIC_PATHS
from api.buffered_responses import rewriting, with_length
from api.errors import STATUS_CODES, UNTOUCHED_PATHS
from core.errors import NeuroNovaError
from core.schemas import TaskStatusResponse

DOCS_PATH = "/docs.json"
REF = "#/components/schemas/{model}"
ERRORS = {"400": "Invalid request", "404": "Not found", "413": "Body too large", "422": "Invalid request",
          "429": "Rate limited", "500": "Unexpected server error", "503": "Unavailable or overloaded"}


def error_codes() -> list[str]:
    """Every `error.code` the service answers: its errors' codes and those `api.errors` gives other errors."""
    classes, codes = [NeuroNovaError], set(STATUS_CODES.values())
    while classes:
        cls = classes.pop()
        codes.add(cls.code)
        classes += cls.__subclasses__()
    return sorted(codes)


def error_schema() -> dict[str, Any]:
    return {
        "type": "object", "title": "ErrorResponse", "required": ["success", "error"],
        "description": "Every error of every route but the probes (SPEC.md): never a submitted value.",
        "properties": {
            "success": {"type": "boolean", "enum": [False]},
            "error": {"type": "object", "required": ["code", "message", "details", "timestamp"], "properties": {
                "code": {"type": "string", "enum": error_codes()},
                "message": {"type": "string"},
                "details": {"type": "object"},
                "timestamp": {"type": "string", "format": "date-time"},
            }},
        },
    }


TASK_SUBMITTED = {
    "type": "object", "title": "TaskSubmitted", "required": ["task_id", "status"],
    "description": "A task accepted: poll GET /task/{task_id} (or …/status), then …/get.",
    "properties": {"task_id": {"type": "string"}, "status": {"type": "string", "enum": ["in_progress", "pending"]}},
}
BENTOML_TASK_STATUS = {
    "type": "object", "title": "BentoMLTaskStatus", "required": ["task_id", "status", "created_at", "executed_at"],
    "properties": {
        "task_id": {"type": "string"},
        "status": {"type": "string", "enum": ["pending", "in_progress", "completed", "failed", "canceled"]},
        "created_at": {"type": "string"},
        "executed_at": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "completed_at": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
}


def _json(schema_name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": REF.format(model=schema_name)}}}}


def _errors_of(path: str) -> dict[str, str]:
    errors = dict(ERRORS)
    if path not in PUBLIC_PATHS:
        errors["401"] = "No valid token"
    if path in ADMIN_PATHS or path.startswith(ADMIN_PREFIXES):
        errors["403"] = "The admin role is required"
    if path.endswith("/get"):
        errors["409"] = "The task was cancelled"
    return errors


def _files_as_binary(node: Any) -> Any:
    """BentoML's `type: file` (not JSON Schema) as OpenAPI's binary string."""
    if isinstance(node, dict):
        return {key: "string" if key == "type" and value == "file" else _files_as_binary(value)
                for key, value in node.items()}
    return [_files_as_binary(item) for item in node] if isinstance(node, list) else node


def _model_schema(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, Any]:
    """`model`'s JSON schema, its definitions moved into `schemas`."""
    schema = _files_as_binary(model.model_json_schema(ref_template=REF))
    schemas.update(schema.pop("$defs", {}))
    return schema


def _set_bodies(paths: dict[str, Any], schemas: dict[str, Any], apis: Mapping[str, Any]) -> None:
    """Each API method's input schema on its route (and `/submit`), its output schema on its 200 (a task's `/get`)."""
    for method in apis.values():
        request, response = _model_schema(method.input_spec, schemas), _model_schema(method.output_spec, schemas)
        routes = [method.route, f"{method.route}/submit"] if method.is_task else [method.route]
        for route in routes:
            for content in paths[route]["post"].get("requestBody", {}).get("content", {}).values():
                content["schema"] = request
        answered = paths[f"{method.route}/get"]["get"] if method.is_task else paths[method.route]["post"]
        answered["responses"]["200"]["content"]["application/json"]["schema"] = response


def complete(spec: dict[str, Any], apis: Mapping[str, Any]) -> dict[str, Any]:
    """`spec` (BentoML's document, as JSON) with the declarations the module doc lists; `apis`: the service's API
    methods (BentoML's `Service.apis`)."""
    spec["openapi"] = "3.1.0"
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    _set_bodies(spec["paths"], schemas, apis)
    schemas["ErrorResponse"] = error_schema()
    schemas["TaskSubmitted"] = TASK_SUBMITTED
    schemas["BentoMLTaskStatus"] = BENTOML_TASK_STATUS
    task_status = TaskStatusResponse.model_json_schema(ref_template=REF)
    schemas.update(task_status.pop("$defs", {}))
    schemas["TaskStatusResponse"] = task_status
    for name in ("InvalidArgument", "NotFound", "InternalServerError", "HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for path, item in spec.get("paths", {}).items():
        if path in UNTOUCHED_PATHS:  # the probes, /health and /metrics: their own bodies, their own declarations
            continue
        for operation in item.values():
            responses = operation.setdefault("responses", {})
            for status, description in _errors_of(path).items():
                responses[status] = _json("ErrorResponse", description)
    for route in (method.route for method in apis.values() if method.is_task):
        paths = spec["paths"]
        base = paths[route]["post"]["responses"]
        base.pop("200", None)
        base["202"] = _json("TaskSubmitted", "Submitted as a task (the design's asynchronous route)")
        for name in ("submit", "retry"):
            paths[f"{route}/{name}"]["post"]["responses"]["200"] = _json("TaskSubmitted", "Submitted as a task")
        paths[f"{route}/status"]["get"]["responses"]["200"] = _json("BentoMLTaskStatus", "The task's status")
        paths[f"{route}/cancel"]["put"]["responses"]["200"] = _json("TaskStatusResponse", "The task, cancelled")
    return spec


class OpenAPIMiddleware:
    """Serves `/docs.json` completed (`complete`)."""

    def __init__(self, app: ASGIApp, apis: Mapping[str, Any]) -> None:
        self.app = app
        self.apis = apis

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != DOCS_PATH or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        async def send_completed(start: Message, body: bytes) -> None:
            completed = json.dumps(complete(json.loads(body), self.apis)).encode()
            await send({**start, "headers": with_length(start.get("headers", []), completed)})
            await send({"type": "http.response.body", "body": completed})

        capture = rewriting(send, lambda status: status == 200, send_completed)
        await self.app(scope, receive, capture)
