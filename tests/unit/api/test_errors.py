"""Every error leaves the service in the SPEC.md schema, whoever raised it."""

import asyncio
import json

import pytest
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from api.errors import ErrorSchemaMiddleware, as_neuronova_error, handles_errors
from core.errors import ImageTooLarge, InternalServerError, InvalidImageFormat, InvalidRequest

SPEC_KEYS = {"code", "message", "details", "timestamp"}


def assert_schema(response, status: int, code: str) -> dict:
    assert response.status_code == status
    body = response.json()
    assert body["success"] is False and set(body["error"]) == SPEC_KEYS
    assert body["error"]["code"] == code
    return body["error"]


def bentoml_like_app() -> Starlette:
    async def validation(_):
        return JSONResponse({"error": "1 validation error for Input", "detail": [{"loc": ["image"], "msg": "Field required"}]}, 400)

    async def list_body(_):
        return JSONResponse([{"error": "crp must be >= 0"}], 400)

    async def crash(_):
        return JSONResponse({"error": "An unexpected error has occurred, please check the server log."}, 500)

    async def text_413(_):
        return PlainTextResponse("Content Too Large", 413)

    async def ours(_):
        return JSONResponse(InvalidImageFormat("not an image").to_body(), 400)

    async def ok(_):
        return JSONResponse({"fine": True})

    async def health(_):
        return JSONResponse({"status": "degraded"}, 503)

    async def empty_503(_):
        return Response(b"", 503)

    routes = [Route(p, f) for p, f in [("/validation", validation), ("/list", list_body), ("/crash", crash),
                                       ("/text", text_413), ("/ours", ours), ("/ok", ok), ("/health", health),
                                       ("/busy", empty_503)]]
    app = Starlette(routes=routes)
    return ErrorSchemaMiddleware(app)


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(bentoml_like_app())


def test_bentoml_validation_error_becomes_invalid_request_with_details(client):
    error = assert_schema(client.get("/validation"), 400, "INVALID_REQUEST")
    assert error["details"]["errors"][0]["loc"] == ["image"]


def test_bentoml_list_body_becomes_schema(client):
    assert assert_schema(client.get("/list"), 400, "INVALID_REQUEST")["message"] == "crp must be >= 0"


def test_500_is_generic(client):
    assert assert_schema(client.get("/crash"), 500, "INTERNAL_SERVER_ERROR")["message"] == "unexpected server error"


def test_plain_text_and_empty_bodies(client):
    assert assert_schema(client.get("/text"), 413, "IMAGE_TOO_LARGE")["message"] == "Content Too Large"
    assert_schema(client.get("/busy"), 503, "SERVICE_UNAVAILABLE")
    assert_schema(client.get("/missing"), 404, "NOT_FOUND")


def test_schema_bodies_and_successes_pass_untouched(client):
    assert assert_schema(client.get("/ours"), 400, "INVALID_IMAGE_FORMAT")["message"] == "not an image"
    assert client.get("/ok").json() == {"fine": True}
    assert client.get("/health").json() == {"status": "degraded"}


class Sample(BaseModel):
    age: int


def test_as_neuronova_error_maps_each_kind():
    ours = ImageTooLarge("big")
    assert as_neuronova_error(ours) is ours
    with pytest.raises(ValidationError) as caught:
        Sample(age="old")
    mapped = as_neuronova_error(caught.value)
    assert isinstance(mapped, InvalidRequest) and mapped.details["errors"][0]["loc"] == ["age"]
    assert "old" not in json.dumps(mapped.details)  # inputs are not echoed
    assert isinstance(as_neuronova_error(RuntimeError("secret detail")), InternalServerError)


def test_handles_errors_returns_error_response():
    @handles_errors
    async def route(x: int) -> dict:
        if x < 0:
            raise InvalidRequest("x must be >= 0", {"x": x})
        return {"x": x}

    assert asyncio.run(route(1)) == {"x": 1}
    response = asyncio.run(route(-1))
    assert response.status_code == 400 and json.loads(response.body)["error"]["details"] == {"x": -1}


def test_a_framework_validation_body_loses_the_values_it_quotes() -> None:
    """FastAPI's 422 quotes each refused input (a person's name, say): the error schema keeps where and why only."""
    from api.errors import _message_of

    refused = {"type": "string_pattern_mismatch", "loc": ["body", "study_instance_uid"],
               "msg": "String should match pattern '^[0-9.]+$'", "input": "Doe^Johanna", "ctx": {"pattern": "^[0-9.]+$"}}
    message, details = _message_of(json.dumps({"detail": [refused]}).encode(), 422)
    assert message == "1 invalid field(s)"
    assert details == {"errors": [{"loc": ["body", "study_instance_uid"], "msg": refused["msg"],
                                   "type": "string_pattern_mismatch"}]}


def test_an_unreachable_database_is_a_503_with_retry_after_from_a_route_or_a_middleware() -> None:
    """A route's or a middleware's store call failing because PostgreSQL cannot be reached (refused, timed out, no
    pooled connection) is answered 503 SERVICE_UNAVAILABLE with Retry-After, not a 500."""
    import psycopg
    import sqlalchemy.exc

    from core.errors import DependencyUnavailable

    failures = [psycopg.OperationalError("connection timeout expired"),
                sqlalchemy.exc.OperationalError("SELECT 1", {}, psycopg.OperationalError("server closed")),
                sqlalchemy.exc.TimeoutError("QueuePool limit reached")]
    for failure in failures:
        error = as_neuronova_error(failure)
        assert isinstance(error, DependencyUnavailable) and error.details == {"reason": "database_unreachable"}

    @handles_errors
    async def route() -> dict:
        raise failures[0]

    answer = asyncio.run(route())
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"

    async def middleware_store_call(scope, receive, send):
        raise failures[1]

    client = TestClient(ErrorSchemaMiddleware(middleware_store_call))
    answered = client.get("/task/abc")
    assert answered.headers["retry-after"] == "5"
    assert_schema(answered, 503, "SERVICE_UNAVAILABLE")["details"] == {"reason": "database_unreachable"}
    assert as_neuronova_error(psycopg.errors.UniqueViolation("duplicate")).status == 500  # not an outage
