"""API keys: with any key configured (API_KEYS, API_KEYS_FILE), every request under /v1 needs
`Authorization: Bearer <key>`, what OpenAI's clients send from their `api_key`.

WebSocket handshakes under /v1 (GET /v1/realtime) need the key too, in the same header (the
SDK's realtime client sends it): without it the handshake is answered 401 with the same body,
before any session starts.

An ASGI middleware rather than a dependency of the routers, so that it also answers for paths
under /v1 that no route serves (401, not 404: an unauthenticated client learns nothing of the
API) and runs before the upload-size limit (401, not 413, and no body is read). `/health` and
`/ready` stay open for probes; `/metrics` too unless METRICS_REQUIRE_KEY.

Keys are compared as SHA-256 digests with `hmac.compare_digest`, against every key without
stopping at a match: the time taken tells neither which key matched nor how much of one did.
Keys are never logged, nor echoed in an answer.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from starlette.responses import Response
from starlette.status import WS_1008_POLICY_VIOLATION
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import error_response
from app.settings import Settings
from optim.errors import Kind, ServiceError

PROTECTED_PREFIX = "/v1"
METRICS_PATH = "/metrics"


class InvalidAPIKey(ServiceError):
    kind = Kind.UNAUTHORIZED
    code = "invalid_api_key"

    def __init__(self, missing: bool):
        message = (
            "no API key provided: send it as `Authorization: Bearer <key>` (the openai SDK's api_key)"
            if missing
            else "incorrect API key provided"
        )
        super().__init__(message)


def read_keys_file(path: Path) -> list[str]:
    """One key per line; blank lines and lines starting with `#` are skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ValueError(f"API_KEYS_FILE {path} cannot be read: {e.strerror or e}") from None
    keys = [line.strip() for line in lines]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:  # a deployment that meant to be protected must not start open
        raise ValueError(f"API_KEYS_FILE {path} holds no key")
    return keys


def configured_keys(settings: Settings) -> list[str]:
    keys = list(settings.api_keys)
    if settings.api_keys_file is not None:
        keys += read_keys_file(settings.api_keys_file)
    return keys


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The token of `Bearer <token>` (the scheme in any case), or None."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    token = token.strip()
    return token if scheme.lower() == b"bearer" and token else None


class APIKeyAuth:
    """ASGI middleware: 401 `invalid_api_key` (with `WWW-Authenticate: Bearer`) for a protected
    path without one of the keys."""

    def __init__(self, app: ASGIApp, keys: list[str], protect_metrics: bool = False):
        if not keys:
            raise ValueError("APIKeyAuth needs at least one key")
        self.app = app
        self.digests = [_digest(k.encode()) for k in keys]
        self.protect_metrics = protect_metrics

    def protects(self, path: str) -> bool:
        if path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/"):
            return True
        return self.protect_metrics and path == METRICS_PATH

    def accepts(self, token: bytes | None) -> bool:
        candidate = _digest(token or b"")
        matched = False
        for digest in self.digests:  # every key, no early exit
            matched |= hmac.compare_digest(candidate, digest)
        return matched and token is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.protects(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        token = bearer_token(authorization)
        if self.accepts(token):
            await self.app(scope, receive, send)
            return
        error = InvalidAPIKey(missing=token is None)
        response = error_response(error)
        response.headers["WWW-Authenticate"] = "Bearer"
        if scope["type"] == "websocket":
            await refuse_websocket(scope, receive, send, response, error.message)
            return
        await response(scope, receive, send)


async def refuse_websocket(scope: Scope, receive: Receive, send: Send, response: Response, reason: str) -> None:
    """Refuse a WebSocket handshake before it is accepted: with the HTTP answer itself (401 and
    OpenAI's error body: the SDK raises it as `InvalidStatus`) where the server supports ASGI's
    denial-response extension (uvicorn does), else a close with 1008 (policy violation) and the reason."""
    message = await receive()  # websocket.connect
    if message["type"] != "websocket.connect":
        return
    if "websocket.http.response" in scope.get("extensions", {}):
        await response(scope, receive, send)
    else:
        await send({"type": "websocket.close", "code": WS_1008_POLICY_VIOLATION, "reason": reason[:120]})
