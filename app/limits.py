"""Limits on what a client sends and how slowly: oversized uploads are refused while they
arrive, before the body is parsed or held in memory; a request whose headers or body stall is
cut off, so dripping clients cannot hold connections open."""

from __future__ import annotations

import asyncio
import json

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.errors import STATUS, APIError, error_body, error_response
from optim.errors import Kind, ServiceError


class UploadTooLarge(ServiceError):
    kind = Kind.TOO_LARGE
    code = "file_too_large"

    def __init__(self, limit: int):
        super().__init__(f"the upload is larger than the limit of {limit / 2**20:g} MiB (setting MAX_UPLOAD_MB)", "file")


class RequestTimeout(ServiceError):
    kind = Kind.TIMEOUT
    code = "request_timeout"

    def __init__(self, seconds: float):
        super().__init__(f"the request body stalled for over {seconds:g} s (setting REQUEST_READ_TIMEOUT_S)", "file")


class UploadSizeLimit:
    """ASGI middleware: a declared Content-Length over the limit is refused at once; a body
    without one (chunked) is counted as it streams and cut off at the limit. A body that stalls
    for `read_timeout` seconds between pieces is answered 408."""

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout: float = 30.0):
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        # multipart framing adds a little to the file itself: allow 64 KiB for it
        limit = self.max_bytes + 64 * 1024
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await error_response(UploadTooLarge(self.max_bytes))(scope, receive, send)
            return

        received = 0
        complete = False

        async def counting_receive() -> Message:
            nonlocal received, complete
            if complete:  # what comes after the body (a disconnect) may take any time
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except asyncio.TimeoutError:
                raise APIError(RequestTimeout(self.read_timeout)) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > limit:
                    raise APIError(UploadTooLarge(self.max_bytes))  # an HTTPException: FastAPI's parser lets it through
            return message

        await self.app(scope, counting_receive, send)


def http_protocol(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol, with two changes: a connection whose request line and
    headers have not all arrived `header_timeout` seconds after its first byte (or after it
    opened) is closed (uvicorn has no such timeout; its keep-alive timeout covers only the idle
    time between requests), and a request it cannot parse (malformed, or headers over h11's
    16 KiB) is answered 400 in OpenAI's error shape rather than in plain text."""
    seconds = header_timeout

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:  # bytes of a new request
                self._arm()
            super().data_received(data)
            if self.conn.their_state is not h11.SEND_BODY and self.conn.their_state is not h11.DONE:
                return  # still reading the headers
            self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def send_400_response(self, msg: str) -> None:
            status = STATUS[Kind.INVALID]
            body = json.dumps(error_body(status, f"{msg} (malformed, or headers over 16 KiB)", "invalid_http_request")).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
            for event in (h11.Response(status_code=status, headers=headers, reason=b"Bad Request"), h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def _too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE:  # the request's headers are not all in yet
                self.transport.close()

    return HeaderTimeoutProtocol
