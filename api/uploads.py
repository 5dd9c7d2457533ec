"""Upload routes, checked while the body streams in, before BentoML parses it (or, for a task, stores it):

- uploads must be uploads: BentoML downloads a file field given as a string (a multipart text part or a form
  field) and a body that is a bare URL; both are refused, so the service never fetches an address a client names;
- the `patient_id` form field must look anonymised (`api.phi`): a task route would otherwise keep a name or birth
  date in BentoML's task store and fail only later;
- a route's field checks (`FieldCheck`, e.g. an MRI study lacking a sequence the served model requires: `api.mri_submit`)
  run once the whole body has arrived, before the route sees its end, so a task route stores nothing it would refuse;
- on a task route, the whole body is validated against the method's input model as BentoML will validate it
  (`task_inputs_by_path`; a multipart or urlencoded form, else JSON): BentoML answers a task submission (200 and a
  task id) *before* it validates the input, so an MRI study without an image, with `xai=[1]`, or an empty or
  non-JSON body, was accepted and failed as a task; it is a 400 now.

A multipart body that cannot be parsed is refused too (BentoML answered it with a 500). Refusals are 400
INVALID_REQUEST."""

from __future__ import annotations

import json
import types
import typing
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from pydantic import BaseModel, ValidationError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response, validation_details
from api.phi import check_patient_id
from core.errors import InvalidRequest

PATIENT_FIELD = "patient_id"
MAX_ID_BYTES = 1024
MAX_CHECKED_BYTES = 4096
MAX_FORM_BYTES = 64 * 1024
"""The form fields (files aside) a task route's input validation reads; a larger form is left to BentoML's."""
MALFORMED = InvalidRequest("the multipart body cannot be parsed", {"reason": "malformed_multipart"})
"""A multipart body python-multipart cannot parse (a part without headers, ...): Starlette raises HTTPException 400
inside BentoML's route, which BentoML answers with a 500; refused here before."""
UPLOADED = Path("/dev/null")
"""What stands for an uploaded file when a form is validated before BentoML stores it."""
FieldCheck = Callable[[Any], Awaitable[InvalidRequest | None]]
"""A check of a form field's value (decoded as BentoML does: `_form_value`): the refusal, or None."""


def file_fields_by_path(apis: Mapping[str, Any]) -> dict[str, frozenset[str]]:
    """Request path of every BentoML API method → names of its file fields (empty for a JSON route, whose multipart
    bodies are inspected too: BentoML parses them as forms), from BentoML's API methods (a task's fields apply to
    `/submit`)."""
    paths: dict[str, frozenset[str]] = {}
    for method in apis.values():
        paths[method.route] = fields = frozenset(method.input_spec.multipart_fields)
        if getattr(method, "is_task", False):
            paths[f"{method.route}/submit"] = fields
    return paths


def task_inputs_by_path(apis: Mapping[str, Any]) -> dict[str, type[BaseModel]]:
    """Task route (the base route and `/submit`) → its input model, from BentoML's API methods."""
    return {path: method.input_spec for method in apis.values() if getattr(method, "is_task", False)
            for path in (method.route, f"{method.route}/submit")}


def _is_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return typing.get_origin(annotation) is list


def validate_form(model: type[BaseModel], form: Mapping[str, bytes], files: Mapping[str, int]) -> InvalidRequest | None:
    """The refusal of a multipart form by `model` as BentoML reads the form (`MultipartSerde.parse_request`: a field's
    last value, JSON-decoded where it parses; every part of a file field, as a list where the field is one), with
    UPLOADED for each file; or None."""
    data: dict[str, Any] = {name: _form_value(raw) for name, raw in form.items()}
    for name, count in files.items():
        annotation = model.model_fields[name].annotation if name in model.model_fields else None
        data[name] = [UPLOADED] * count if _is_list(annotation) else UPLOADED
    try:
        model.model_validate(data)
    except ValidationError as exc:
        return InvalidRequest(f"{exc.error_count()} invalid field(s)", validation_details(exc))
    return None


def validate_body(model: type[BaseModel], body: bytes, content_type: bytes,
                  fields: frozenset[str]) -> InvalidRequest | None:
    """The refusal of a whole non-multipart body by `model` as BentoML will read it: a urlencoded form like a
    multipart one, anything else as JSON (an object; a file field's strings are files' contents there), or None."""
    if content_type.lower().startswith(b"application/x-www-form-urlencoded"):
        form = dict(parse_qsl(body.decode("latin-1"), keep_blank_values=True))
        return validate_form(model, {name: value.encode("latin-1") for name, value in form.items()}, {})
    try:
        data = json.loads(body)
    except ValueError:
        return InvalidRequest("the body is neither a multipart form nor JSON")
    if not isinstance(data, dict):
        return InvalidRequest("the body must be a JSON object or a multipart form")
    for name in fields & data.keys():
        value = data[name]
        if isinstance(value, str):
            data[name] = UPLOADED
        elif isinstance(value, list) and all(isinstance(item, str) for item in value):
            data[name] = [UPLOADED] * len(value)
    try:
        model.model_validate(data)
    except ValidationError as exc:
        return InvalidRequest(f"{exc.error_count()} invalid field(s)", validation_details(exc))
    return None


def _not_a_file(field: str) -> InvalidRequest:
    return InvalidRequest(f"{field!r} must be an uploaded file (multipart with a filename); URLs and paths are not "
                          "fetched", {"field": field})


def _form_value(raw: bytes) -> Any:
    """A form field's value as BentoML decodes it: JSON if it parses, else the text."""
    text = raw.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def _patient_id_error(raw: bytes) -> InvalidRequest | None:
    """The refusal of a form's patient id, or None."""
    try:
        check_patient_id(str(_form_value(raw)))
    except ValueError as exc:
        return InvalidRequest(str(exc), {"field": PATIENT_FIELD})
    return None


class _PartInspector:
    """Pushes a multipart body through python-multipart and notes the first refusal: a file field sent as a text
    part (no `filename`: Starlette then hands BentoML a string, which BentoML downloads), or a patient id that does
    not look anonymised. Keeps the last value of each field in `checks` (BentoML reads the last one; a value over
    MAX_CHECKED_BYTES is not checked) for `checks_error`, and, with an input `model`, the last value of every other
    field (up to MAX_FORM_BYTES in all) and the count of each file field's parts."""

    def __init__(self, boundary: bytes, fields: frozenset[str], checks: Mapping[str, FieldCheck],
                 model: type[BaseModel] | None = None) -> None:
        self.fields = fields
        self.checks = checks
        self.model = model
        self.values: dict[str, bytearray] = {}
        self.form: dict[str, bytearray] = {}
        self.files: Counter[str] = Counter()
        self.form_bytes = 0
        self._form_part: bytearray | None = None
        self.error: InvalidRequest | None = None
        self.broken = False
        self._checked: bytearray | None = None
        self._name = b""
        self._value = b""
        self._disposition = b""
        self._patient_id: bytearray | None = None
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        })

    def feed(self, chunk: bytes) -> None:
        if self.broken or self.error is not None or not chunk:
            return
        try:
            self.parser.write(chunk)
        except Exception:  # noqa: BLE001 - any parse error: Starlette's would be a 400 that BentoML turns into a 500
            self.broken = True
            self.error = MALFORMED

    def _part_begin(self) -> None:
        self._disposition = b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if self._name.lower() == b"content-disposition":
            self._disposition = self._value
        self._name, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name in self.fields and b"filename" not in options:
            self.error = self.error or _not_a_file(name)
        self._patient_id = bytearray() if name == PATIENT_FIELD and b"filename" not in options else None
        self._checked = None
        if name in self.checks:
            self._checked = self.values[name] = bytearray()
        self._form_part = None
        if self.model is not None and name in self.fields:
            self.files[name] += 1
        elif self.model is not None:
            self.form_bytes -= len(self.form.get(name, b""))
            self._form_part = self.form[name] = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._patient_id is not None:
            self._patient_id += data[start:min(end, start + MAX_ID_BYTES - len(self._patient_id))]
        if self._checked is not None:
            self._checked += data[start:min(end, start + MAX_CHECKED_BYTES + 1 - len(self._checked))]
        if self._form_part is not None:
            self._form_part += data[start:min(end, start + MAX_FORM_BYTES + 1 - self.form_bytes)]
            self.form_bytes += min(end - start, MAX_FORM_BYTES + 1 - self.form_bytes)

    def _part_end(self) -> None:
        if self._patient_id is not None:
            self.error = self.error or _patient_id_error(bytes(self._patient_id))
            self._patient_id = None
        self._checked = None

    async def checks_error(self) -> InvalidRequest | None:
        """The first refusal of the input model or the route's field checks, on the fields sent (the whole body has
        been fed)."""
        if self.broken:
            return None
        if self.model is not None and self.form_bytes <= MAX_FORM_BYTES and (error := validate_form(
                self.model, {name: bytes(raw) for name, raw in self.form.items()}, self.files)):
            return error
        for name, check in self.checks.items():
            raw = self.values.get(name)
            if raw is not None and len(raw) <= MAX_CHECKED_BYTES and (error := await check(_form_value(bytes(raw)))):
                return error
        return None


def _whole_body_error(body: bytes, content_type: bytes, fields: frozenset[str]) -> InvalidRequest | None:
    """For a whole non-multipart body: a file field or bad patient id in a urlencoded form, or a bare URL body."""
    if content_type.lower().startswith(b"application/x-www-form-urlencoded"):
        form = dict(parse_qsl(body.decode("latin-1"), keep_blank_values=True))
        named_file = min(form.keys() & fields, default=None)
        if named_file is not None:
            return _not_a_file(named_file)
        return _patient_id_error(form[PATIENT_FIELD].encode()) if PATIENT_FIELD in form else None
    text = body.strip().strip(b"\"'").decode("utf-8", "replace")
    return _not_a_file(min(fields)) if urlsplit(text).scheme and "://" in text else None


class UploadGuardMiddleware:
    """400 INVALID_REQUEST on an upload route when a file field arrives as a string (a URL BentoML would download),
    the form's patient id does not look anonymised, the path's input model in `validated` refuses the form, or one
    of the path's `field_checks` refuses (the last two multipart only); on any route of `file_fields`, for a
    multipart body that cannot be parsed or whose patient id does not look anonymised."""

    def __init__(self, app: ASGIApp, file_fields: dict[str, frozenset[str]],
                 field_checks: Mapping[str, Mapping[str, FieldCheck]] | None = None,
                 validated: Mapping[str, type[BaseModel]] | None = None) -> None:
        self.app = app
        self.file_fields = file_fields
        self.field_checks = field_checks or {}
        self.validated = validated or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fields = self.file_fields.get(scope["path"]) if scope["type"] == "http" else None
        if fields is None or scope["method"] not in ("POST", "PUT"):
            await self.app(scope, receive, send)
            return
        content_type = dict(scope["headers"]).get(b"content-type", b"")
        if content_type.lower().startswith(b"multipart/"):  # any API route: BentoML parses a multipart body of each
            await self._multipart(scope, receive, send, content_type, fields)
        elif fields:  # an upload route
            await self._whole_body(scope, receive, send, content_type, fields)
        else:
            await self.app(scope, receive, send)

    async def _whole_body(self, scope: Scope, receive: Receive, send: Send, content_type: bytes,
                          fields: frozenset[str]) -> None:
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        error = _whole_body_error(body, content_type, fields)
        model = self.validated.get(scope["path"])
        if error is None and model is not None:
            error = validate_body(model, body, content_type, fields)
        if error is not None:
            await error_response(error)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _multipart(self, scope: Scope, receive: Receive, send: Send, content_type: bytes,
                         fields: frozenset[str]) -> None:
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            if scope["path"] in self.validated:  # BentoML would store it and fail it as a task
                await error_response(InvalidRequest("a multipart body needs its boundary"))(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        inspector = _PartInspector(boundary, fields, self.field_checks.get(scope["path"], {}),
                                   self.validated.get(scope["path"]))
        answered = False

        async def inspecting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                inspector.feed(message.get("body", b""))
                if inspector.error is None and not message.get("more_body", False):
                    inspector.error = await inspector.checks_error()
                if inspector.error is not None:
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal answered
            if inspector.error is None:
                await send(message)
            elif message["type"] == "http.response.start" and not answered:
                answered = True
                await error_response(inspector.error)(scope, receive, send)

        try:
            await self.app(scope, inspecting_receive, guarded_send)
        except Exception:
            if inspector.error is None:
                raise
        if inspector.error is not None and not answered:
            await error_response(inspector.error)(scope, receive, send)
