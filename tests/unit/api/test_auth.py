"""JWT checks: every rejection is a 401 in the error schema; admin paths need the admin role."""

import time

import jwt
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from api.auth import JWTAuthMiddleware, verify_token
from core.errors import Unauthorized
from core.settings import AuthSettings

SECRET = "test-secret-of-sufficient-length-0123456789"
AUTH = AuthSettings(secret=SECRET, audience="neuronova", issuer="django")


def token(**overrides) -> str:
    claims = {"sub": "django-app", "aud": "neuronova", "iss": "django", "exp": time.time() + 60, "role": "clinician"}
    claims.update(overrides)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, overrides.pop("key", SECRET), algorithm="HS256")


async def whoami(request: Request) -> JSONResponse:
    return JSONResponse(request.scope.get("state", {}).get("claims", {}))


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = Starlette(routes=[Route(p, whoami, methods=["GET", "POST"]) for p in ("/health", "/predict/x", "/update_model")])
    return TestClient(JWTAuthMiddleware(app, auth=AUTH))


def get(client, path="/predict/x", value=None):
    headers = {"Authorization": value} if value is not None else {}
    return client.get(path, headers=headers)


def test_valid_token_passes_claims(client):
    response = get(client, value=f"Bearer {token()}")
    assert response.status_code == 200 and response.json()["sub"] == "django-app"


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Basic abc",
        "Bearer ",
        "Bearer not.a.jwt",
        f"Bearer {token(exp=time.time() - 3600)}",
        f"Bearer {token(nbf=time.time() + 3600)}",
        f"Bearer {token(aud='someone-else')}",
        f"Bearer {token(iss='evil')}",
        f"Bearer {token(exp=None)}",
        f"Bearer {jwt.encode({'sub': 'x', 'aud': 'neuronova', 'iss': 'django', 'exp': time.time() + 60}, 'wrong-key-wrong-key-wrong-key-0000', algorithm='HS256')}",
        "Bearer " + jwt.encode({"sub": "x", "aud": "neuronova", "iss": "django", "exp": time.time() + 60}, None, algorithm="none"),
    ],
    ids=["missing", "basic", "empty", "garbage", "expired", "not-yet-valid", "audience", "issuer", "no-exp", "wrong-key", "alg-none"],
)
def test_rejections_are_401_in_schema(client, header):
    response = get(client, value=header)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "UNAUTHORIZED"
    assert response.headers["www-authenticate"] == "Bearer"


def test_public_paths_need_no_token(client):
    assert get(client, "/health").status_code == 200


def test_admin_path_needs_admin_role(client):
    forbidden = get(client, "/update_model", f"Bearer {token()}")
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "FORBIDDEN"
    assert get(client, "/update_model", f"Bearer {token(role='admin')}").status_code == 200


def test_disabled_auth_lets_everything_through():
    app = JWTAuthMiddleware(Starlette(routes=[Route("/predict/x", whoami)]), auth=AuthSettings(enabled=False))
    assert TestClient(app).get("/predict/x").status_code == 200


def test_no_key_configured_is_refused():
    with pytest.raises(Unauthorized, match="no verification key"):
        verify_token(token(), AuthSettings())


def test_pacs_routes_need_the_admin_role_and_notify_also_takes_the_pacs_token():
    routes = [Route(p, whoami, methods=["GET", "POST"]) for p in ("/pacs/notify", "/pacs/jobs")]
    client = TestClient(JWTAuthMiddleware(Starlette(routes=routes), auth=AUTH,
                                          path_tokens={"/pacs/notify": "pacs-static-token", "/pacs/jobs": ""}))
    for path in ("/pacs/notify", "/pacs/jobs"):
        assert get(client, path, f"Bearer {token()}").status_code == 403
        assert get(client, path, f"Bearer {token(role='admin')}").status_code == 200
    accepted = get(client, "/pacs/notify", "Bearer pacs-static-token")
    assert accepted.status_code == 200 and accepted.json() == {"sub": "static token of /pacs/notify"}
    assert get(client, "/pacs/jobs", "Bearer pacs-static-token").status_code == 401  # only where it is configured
    assert get(client, "/pacs/notify", "Bearer pacs-static-tokeN").status_code == 401
