"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and the one table
from an error's kind to its HTTP status. Every error the library or the shell raises for a
request is a `ServiceError` (optim/errors.py) with a kind; only this module knows statuses.
Bad input always gets a 4xx with a clear message, never a bare 500."""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from optim.errors import InvalidRequest, Kind, ServiceError

log = logging.getLogger(__name__)

STATUS: dict[Kind, int] = {
    Kind.INVALID: 400,
    Kind.UNAUTHORIZED: 401,
    Kind.NOT_FOUND: 404,
    Kind.TOO_LARGE: 413,
    Kind.UNSUPPORTED_MEDIA: 415,
    Kind.OVERLOADED: 503,
    Kind.NOT_READY: 503,
    Kind.RATE_LIMITED: 429,
    Kind.TIMEOUT: 408,
    Kind.CLIENT_CLOSED: 499,  # nginx's: a client that closed the connection before its answer
}
INTERNAL_ERROR = 500  # the status no error kind stands for: an unexpected failure
CLIENT_CLOSED = STATUS[Kind.CLIENT_CLOSED]


class APIError(StarletteHTTPException):
    """A `ServiceError` on its way to the client. Subclassing HTTPException lets it pass through
    FastAPI's own body parsing untouched (an upload cut off for size, say)."""

    def __init__(self, error: ServiceError):
        headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
        super().__init__(status_code=STATUS[error.kind], detail=error.message, headers=headers)
        self.error = error


# The codes of the errors Starlette and FastAPI raise themselves (their only 400 is a body that
# does not parse); any other status gets its HTTP reason phrase as a code, so no code is null.
HTTP_CODES = {400: "invalid_multipart", 404: "not_found", 405: "method_not_allowed"}


def http_code(status: int) -> str:
    if status in HTTP_CODES:
        return HTTP_CODES[status]
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "http_error"


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_object(error: ServiceError) -> dict:
    """The error's {"message", "type", "param", "code"}, as in the HTTP body: what a realtime
    `error` event carries (app/realtime.py), typed by the status its kind would have."""
    return error_body(STATUS[error.kind], error.message, error.code, error.param)["error"]


def error_response(error: ServiceError) -> JSONResponse:
    api = APIError(error)
    return JSONResponse(error_body(api.status_code, error.message, error.code, error.param), api.status_code, api.headers)


def _validation_error(exc: RequestValidationError) -> ServiceError:
    first = exc.errors()[0]
    location = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    param = ".".join(location) or None
    return InvalidRequest(f"invalid value for {param or 'request'}: {first.get('msg')}", param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI answers 400 (not FastAPI's 422) for a bad parameter.
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, APIError):
            return error_response(exc.error)
        # Starlette's and FastAPI's own: no such route, method not allowed, a body that is not
        # valid multipart (no or a wrong boundary, a part without a name, too many fields or files)
        body = error_body(exc.status_code, str(exc.detail), http_code(exc.status_code))
        return JSONResponse(body, exc.status_code, exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        body = error_body(INTERNAL_ERROR, "internal error; the server logged the details", "internal_error")
        return JSONResponse(body, INTERNAL_ERROR)
