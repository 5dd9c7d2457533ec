"""JWT checks: every rejection is a 401 in the error schema; admin paths need the admin role."""

import re
import time

import jwt
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from api.auth import (
    JWTAuthMiddleware,
    UnsafeStart,
    check_start,
    current_owner,
    current_subject,
    serving_host,
    verify_token,
)
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
        f"Bearer {token(aud=None)}",
        f"Bearer {token(iss=None)}",
        f"Bearer {token(exp=None)}",
        f"Bearer {jwt.encode({'sub': 'x', 'aud': 'neuronova', 'iss': 'django', 'exp': time.time() + 60}, 'wrong-key-wrong-key-wrong-key-0000', algorithm='HS256')}",
        "Bearer " + jwt.encode({"sub": "x", "aud": "neuronova", "iss": "django", "exp": time.time() + 60}, None, algorithm="none"),
    ],
    ids=["missing", "basic", "empty", "garbage", "expired", "not-yet-valid", "audience", "issuer", "no-audience",
         "no-issuer", "no-exp", "wrong-key", "alg-none"],
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


def test_a_metrics_token_closes_metrics_to_all_but_it_and_admins():
    routes = [Route("/metrics", whoami)]
    closed = TestClient(JWTAuthMiddleware(Starlette(routes=routes),
                                          auth=AUTH.model_copy(update={"metrics_token": "scrape-token-0123456789"})))
    assert get(closed, "/metrics").status_code == 401
    assert get(closed, "/metrics", f"Bearer {token()}").status_code == 403  # a clinician's token is not enough
    assert get(closed, "/metrics", f"Bearer {token(role='admin')}").status_code == 200
    assert get(closed, "/metrics", "Bearer scrape-token-0123456789").status_code == 200
    assert get(closed, "/metrics", "Bearer scrape-token-012345678").status_code == 401
    assert get(TestClient(JWTAuthMiddleware(Starlette(routes=routes), auth=AUTH)), "/metrics").status_code == 200


@pytest.mark.parametrize("auth, problem", [
    (AuthSettings(), "at least 32 bytes"),
    (AuthSettings(secret="x"), "at least 32 bytes for HS256 (it is 1)"),
    (AuthSettings(secret="s" * 31), "it is 31"),
    (AuthSettings(algorithms=["RS256"]), "NEURONOVA_AUTH__PUBLIC_KEY"),
    (AuthSettings(algorithms=["none"]), "no usable algorithm"),
])
def test_a_server_with_auth_on_refuses_to_start_without_a_real_key(auth, problem):
    with pytest.raises(UnsafeStart, match=re.escape(problem)):
        check_start(auth, "127.0.0.1")


def test_a_server_with_auth_on_and_a_real_key_starts_anywhere():
    check_start(AuthSettings(secret="s" * 32), "0.0.0.0")
    check_start(AuthSettings(algorithms=["ES256"], public_key="-----BEGIN PUBLIC KEY-----..."), "0.0.0.0")


def test_a_server_without_auth_serves_loopback_only_unless_told_loudly(caplog):
    off = AuthSettings(enabled=False)
    for host in ("127.0.0.1", "localhost", "::1", None):
        check_start(off, host)
    with pytest.raises(UnsafeStart, match="NEURONOVA_AUTH__ALLOW_UNAUTHENTICATED_NETWORK"):
        check_start(off, "0.0.0.0")
    check_start(AuthSettings(enabled=False, allow_unauthenticated_network=True), "0.0.0.0")
    assert "authentication is OFF" in caplog.text


@pytest.mark.parametrize("argv, host", [
    (["bentoml", "serve", "service:NeuroNova"], "0.0.0.0"),
    (["bentoml", "serve", "service:NeuroNova", "--host", "10.0.0.5", "--port", "3000"], "10.0.0.5"),
    (["bentoml", "serve", "--host=127.0.0.1"], "127.0.0.1"),
    (["bentoml", "build"], None),
    (["pytest", "tests"], None),
])
def test_the_bound_address_is_read_from_bentoml_serve_s_command_line(argv, host):
    assert serving_host(argv) == host


def test_the_owner_is_the_configured_claim_and_the_reviewer_the_subject():
    async def owner(request: Request) -> JSONResponse:
        return JSONResponse({"owner": current_owner(), "subject": current_subject()})

    shared = AuthSettings(secret=SECRET, audience="neuronova", issuer="django", owner_claim="dept")
    client = TestClient(JWTAuthMiddleware(Starlette(routes=[Route("/predict/x", owner)]), auth=shared))
    answer = client.get("/predict/x", headers={"Authorization": f"Bearer {token(sub='dr-a', dept='neuro')}"})
    assert answer.json() == {"owner": "neuro", "subject": "dr-a"}
    answer = client.get("/predict/x", headers={"Authorization": f"Bearer {token(sub='dr-b')}"})  # no dept claim
    assert answer.json() == {"owner": "dr-b", "subject": "dr-b"}
    assert current_owner() == "" and current_subject() == ""  # outside a request
