"""API keys: with any key configured (API_KEYS, API_KEYS_FILE), every request under /v1 needs
`Authorization: Bearer <key>`, what OpenAI's clients send from their `api_key`.

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
        if scope["type"] != "http" or not self.protects(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        token = bearer_token(authorization)
        if self.accepts(token):
            await self.app(scope, receive, send)
            return
        response = error_response(InvalidAPIKey(missing=token is None))
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)
