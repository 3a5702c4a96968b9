"""Reject oversized uploads while they arrive, before the body is parsed or held in memory."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import APIError, error_response
from optim.errors import Kind, ServiceError


class UploadTooLarge(ServiceError):
    kind = Kind.TOO_LARGE
    code = "file_too_large"

    def __init__(self, limit: int):
        super().__init__(f"the upload is larger than the limit of {limit / 2**20:g} MiB (setting MAX_UPLOAD_MB)", "file")


class UploadSizeLimit:
    """ASGI middleware: a declared Content-Length over the limit is refused at once; a body
    without one (chunked) is counted as it streams and cut off at the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

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

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise APIError(UploadTooLarge(self.max_bytes))  # an HTTPException: FastAPI's parser lets it through
            return message

        await self.app(scope, counting_receive, send)
