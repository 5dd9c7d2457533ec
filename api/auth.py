"""Bearer JWT authentication (tokens issued by Django) and the admin role check, as ASGI middleware."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

import jwt
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_response
from core.errors import Forbidden, Unauthorized
from core.settings import AuthSettings

log = logging.getLogger("neuronova.auth")

MIN_HMAC_SECRET_BYTES = 32
"""An HS256 key shorter than the hash (256 bits) is refused (RFC 7518, section 3.2); PyJWT only warns."""
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
METRICS_PATH = "/metrics"
PUBLIC_PATHS = frozenset({"/health", "/livez", "/healthz", "/readyz", METRICS_PATH})
ADMIN_PATHS = frozenset({"/update_model"})
ADMIN_PREFIXES = ("/pacs/",)


class UnsafeStart(RuntimeError):
    """The server would start in a way that exposes patients' data or admin routes: it refuses to."""


def check_start(auth: AuthSettings, bind_host: str | None) -> None:
    """Refuse a start that verifies no token with a real key, or serves without auth beyond loopback.

    With auth on: an HMAC algorithm needs a secret of `MIN_HMAC_SECRET_BYTES` at least, an RSA / EC one a public key.
    With auth off: only a loopback `bind_host` (None: not known here, e.g. a worker), unless
    `allow_unauthenticated_network` says so, which is logged loudly."""
    if auth.enabled:
        algorithms = [a for a in auth.algorithms if a.lower() != "none"]
        if not algorithms:
            raise UnsafeStart("NEURONOVA_AUTH__ALGORITHMS names no usable algorithm")
        if any(a.startswith("HS") for a in algorithms) and len(auth.secret.encode()) < MIN_HMAC_SECRET_BYTES:
            raise UnsafeStart(f"NEURONOVA_AUTH__SECRET must be at least {MIN_HMAC_SECRET_BYTES} bytes for "
                              f"{'/'.join(algorithms)} (it is {len(auth.secret.encode())}): the secret Django signs "
                              "its tokens with; local development without auth: NEURONOVA_AUTH__ENABLED=false")
        if any(a.startswith(("RS", "ES", "PS")) for a in algorithms) and not auth.public_key.strip():
            raise UnsafeStart("NEURONOVA_AUTH__PUBLIC_KEY is required for " + "/".join(algorithms))
        return
    if bind_host is None or bind_host in LOOPBACK_HOSTS:
        return
    if not auth.allow_unauthenticated_network:
        raise UnsafeStart(f"authentication is off (NEURONOVA_AUTH__ENABLED=false) and the server would listen on "
                          f"{bind_host}: serve on 127.0.0.1 (bentoml serve --host 127.0.0.1; make serve does), turn "
                          "auth on, or set NEURONOVA_AUTH__ALLOW_UNAUTHENTICATED_NETWORK=true to expose it anyway")
    log.warning("!!! authentication is OFF and the server listens on %s: anyone who reaches it may read results, "
                "switch models and drive the PACS connection (NEURONOVA_AUTH__ALLOW_UNAUTHENTICATED_NETWORK=true) !!!",
                bind_host)


def serving_host(argv: list[str]) -> str | None:
    """The address `bentoml serve` binds, from its command line (its default is every address); None for any other
    command (a build, a test importing the service)."""
    if argv[1:2] != ["serve"]:
        return None
    for index, argument in enumerate(argv):
        if argument == "--host" and index + 1 < len(argv):
            return argv[index + 1]
        if argument.startswith("--host="):
            return argument.split("=", 1)[1]
    return "0.0.0.0"  # noqa: S104 - BentoML's default, named to be refused


def verify_token(token: str, auth: AuthSettings) -> dict[str, Any]:
    """Decode and verify a JWT with the configured algorithms only (never `none`); raise Unauthorized otherwise."""
    algorithms = [a for a in auth.algorithms if a.lower() != "none"]
    key = auth.public_key if any(a.startswith(("RS", "ES", "PS")) for a in algorithms) else auth.secret
    if not key:
        raise Unauthorized("authentication is enabled but no verification key is configured")
    try:
        return jwt.decode(
            token, key, algorithms=algorithms, audience=auth.audience, issuer=auth.issuer, leeway=auth.leeway_seconds,
            options={"require": ["exp"], "verify_aud": auth.audience is not None},
        )
    except jwt.PyJWTError as exc:
        raise Unauthorized(f"invalid token: {exc}") from None


_CLAIMS: ContextVar[Mapping[str, Any]] = ContextVar("neuronova_token_claims", default={})
_OWNER_CLAIM: ContextVar[str] = ContextVar("neuronova_owner_claim", default="sub")


def current_subject() -> str:
    """The verified token subject (`sub`) of the request being served ("" where auth is off, or outside a request):
    the reviewer a verdict is recorded for. Set by `JWTAuthMiddleware` for everything below it, BentoML tasks the
    request starts included (context variables: API methods need no `ctx` parameter, which would make BentoML answer
    200 for every error response they return, pitfall G23)."""
    return str(_CLAIMS.get().get("sub") or "")


def current_owner() -> str:
    """Whose cached inputs and results the request being served may read and write: the token's
    `NEURONOVA_AUTH__OWNER_CLAIM` (its subject by default; a shared claim, e.g. a department, lets its members review
    each other's requests), its subject where that claim is absent, "" where auth is off."""
    claims = _CLAIMS.get()
    return str(claims.get(_OWNER_CLAIM.get()) or claims.get("sub") or "")


def bearer_token(scope: Scope) -> str:
    """The token of an `Authorization: Bearer ...` header, or Unauthorized."""
    header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer token (Authorization: Bearer <JWT>)")
    return token.strip()


class JWTAuthMiddleware:
    """Verifies the bearer token on every non-public path, puts the claims in `scope["state"]["claims"]`,
    and requires the admin role on admin paths. `path_tokens` are static bearer tokens a path also accepts (what a
    PACS's script sends to `/pacs/notify`). With a metrics token configured, `/metrics` is an admin path that also
    takes that token. Tokens are never logged."""

    def __init__(self, app: ASGIApp, auth: AuthSettings, path_tokens: Mapping[str, str] | None = None) -> None:
        self.app = app
        self.auth = auth
        tokens = {**(path_tokens or {}), METRICS_PATH: auth.metrics_token}
        self.path_tokens = {path: token for path, token in tokens.items() if token}
        protected = {METRICS_PATH} if auth.metrics_token else set()
        self.public, self.admin_paths = PUBLIC_PATHS - protected, ADMIN_PATHS | protected
        if not auth.enabled:
            log.warning("JWT authentication is DISABLED (NEURONOVA_AUTH__ENABLED=false): local development only")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public or not self.auth.enabled:
            await self.app(scope, receive, send)
            return
        try:
            token = bearer_token(scope)
            static = self.path_tokens.get(scope["path"])
            if static is not None and hmac.compare_digest(token.encode(), static.encode()):
                scope.setdefault("state", {})["claims"] = {"sub": f"static token of {scope['path']}"}
                await self.app(scope, receive, send)
                return
            claims = verify_token(token, self.auth)
            admin_path = scope["path"] in self.admin_paths or scope["path"].startswith(ADMIN_PREFIXES)
            if admin_path and claims.get(self.auth.role_claim) != self.auth.admin_role:
                raise Forbidden(f"the {self.auth.admin_role!r} role is required for {scope['path']}")
        except (Unauthorized, Forbidden) as error:
            headers = {"WWW-Authenticate": "Bearer"} if isinstance(error, Unauthorized) else None
            await error_response(error, headers)(scope, receive, send)
            return
        scope.setdefault("state", {})["claims"] = claims
        known, owner_claim = _CLAIMS.set(claims), _OWNER_CLAIM.set(self.auth.owner_claim)
        try:
            await self.app(scope, receive, send)
        finally:
            _CLAIMS.reset(known)
            _OWNER_CLAIM.reset(owner_claim)
