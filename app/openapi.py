"""The OpenAPI document, made true to what the server sends, and `/docs` served from local files.

FastAPI's document lists only each route's 200 and a 422 this server never sends (validation
errors are answered 400, as OpenAI does: app/errors.py). `install_openapi` removes the 422s and
declares every error a route can answer, with OpenAI's error body as its schema and the status
from app/errors.py's table; `schemathesis run --checks all` holds the server to it
(tests/test_schema.py).

`/docs` is Swagger UI from the `swagger-ui-bundle-v2` package (Swagger UI 5, which renders
OpenAPI 3.1 documents like FastAPI's), so it renders without internet access; ReDoc is off.
"""

from __future__ import annotations

import warnings
from http import HTTPStatus
from typing import Literal

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from app.api.audio import COUNTED
from app.errors import CLIENT_CLOSED, STATUS
from app.formats import RENDERERS
from app.streaming import MEDIA_TYPE as EVENT_STREAM
from optim.errors import Kind

# ------------------------------------------------------------------------------ the document


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, for a person.")
    type: Literal["invalid_request_error", "server_error"]
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str = Field(description="A stable machine-readable name of the error (README, Errors).")


class ErrorResponse(BaseModel):
    """OpenAI's error body."""

    error: ErrorDetail


# The kinds of error a client can be answered with (a client that left is answered nobody).
ANSWERED = [k for k in Kind if STATUS[k] != CLIENT_CLOSED]
PROTECTED_PREFIX = "/v1"  # app/auth.py: with API keys configured, 401 without one
# Besides the 401 under /v1, the errors of each path; an operation tagged COUNTED (the audio
# routes) can meet every kind: a bad field or file, an unknown model, a limit, a full queue, ...
PATH_ERRORS: dict[str, list[Kind]] = {"/v1/models/{model_id}": [Kind.NOT_FOUND]}
BEARER = "apiKey"  # the security scheme's name
READY_PATH = "/ready"  # its 503 is the readiness report, as its 200 is
RETRY_AFTER = {Kind.OVERLOADED, Kind.NOT_READY, Kind.RATE_LIMITED}  # the kinds answered with a Retry-After
STREAMED_PATHS = {"/v1/audio/transcriptions"}  # stream=true answers server-sent events (app/streaming.py)


def _error_kinds(path: str, operation: dict) -> list[Kind]:
    kinds = list(ANSWERED) if COUNTED in operation.get("tags", []) else list(PATH_ERRORS.get(path, []))
    if path.startswith(PROTECTED_PREFIX) and Kind.UNAUTHORIZED not in kinds:
        kinds.append(Kind.UNAUTHORIZED)
    return kinds


def _error_response(status: int, kinds: list[Kind]) -> dict:
    response: dict = {
        "description": HTTPStatus(status).phrase,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    headers = {}
    if Kind.UNAUTHORIZED in kinds:
        headers["WWW-Authenticate"] = {"required": True, "schema": {"type": "string", "const": "Bearer"}}
    if RETRY_AFTER & set(kinds):
        headers["Retry-After"] = {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}}
    if headers:
        response["headers"] = headers
    return response


def _success_content(streamed: bool = False) -> dict:
    """The audio routes answer in the requested `response_format`: JSON or text; a streamed one
    (`stream=true`) with server-sent events."""
    content = {
        media: {"schema": {"type": "object"} if media == "application/json" else {"type": "string"}}
        for media in dict.fromkeys(media for media, _ in RENDERERS.values())
    }
    if streamed:
        content[EVENT_STREAM] = {"schema": {"type": "string"}}
    return content


def correct(document: dict, api_keys: bool = False) -> dict:
    """FastAPI's document, in place: no 422s, every error each operation answers, the audio
    formats; with `api_keys`, the bearer scheme on every operation under /v1."""
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            if method == "head":  # a GET route answering HEAD too: FastAPI gives both one id
                operation["operationId"] += "_head"
            if api_keys and path.startswith(PROTECTED_PREFIX):
                operation["security"] = [{BEARER: []}]
            responses = operation["responses"]
            responses.pop("422", None)
            if COUNTED in operation.get("tags", []):
                responses["200"]["content"] = _success_content(streamed=path in STREAMED_PATHS)
            by_status: dict[int, list[Kind]] = {}
            for kind in _error_kinds(path, operation):
                by_status.setdefault(STATUS[kind], []).append(kind)
            for status, kinds in sorted(by_status.items()):
                responses[str(status)] = _error_response(status, kinds)
            if path == READY_PATH:
                responses[str(STATUS[Kind.NOT_READY])] = {
                    "description": "Not ready: a start-up model is loading or failed to load, or the server is shutting down",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
    ids = [op["operationId"] for operations in document.get("paths", {}).values() for op in operations.values()]
    assert len(ids) == len(set(ids)), f"duplicate operation ids: {sorted(ids)}"
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # only the 422s used them
        schemas.pop(name, None)
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error_schema.pop("$defs", {}))
    schemas["ErrorResponse"] = error_schema
    if api_keys:
        document["components"]["securitySchemes"] = {
            BEARER: {"type": "http", "scheme": "bearer", "description": "One of the server's API keys (API_KEYS)."}
        }
    return document


def install_openapi(app: FastAPI, api_keys: bool = False) -> None:
    generate = app.openapi  # FastAPI's: builds the document once and caches it on the app

    def openapi() -> dict:
        if app.openapi_schema is None:
            with warnings.catch_warnings():  # the GET + HEAD routes' shared id, made unique by correct()
                warnings.filterwarnings("ignore", message="Duplicate Operation ID", category=UserWarning)
                correct(generate(), api_keys)
        return app.openapi_schema

    app.openapi = openapi


# ------------------------------------------------------------------------------ /docs

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"


def install_docs(app: FastAPI) -> None:
    """Swagger UI at /docs, its script, style and icon from the installed package."""
    app.mount(ASSETS_PATH, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get(DOCS_PATH, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} API",
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon-32x32.png",
            oauth2_redirect_url=None,
            # no badge fetched from the online validator
            swagger_ui_parameters={"validatorUrl": None},
        )
