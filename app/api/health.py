"""Liveness and readiness probes."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from app.dependencies import get_models, get_shutdown
from app.errors import STATUS
from app.shutdown import Shutdown
from optim.errors import Kind
from optim.models import ModelStore

router = APIRouter(tags=["health"])


@router.api_route("/health", methods=["GET", "HEAD"])  # HEAD: for probes that read no body
async def health() -> dict:
    """The process is up and its event loop answers (it never waits on a model)."""
    return {"status": "ok"}


@router.api_route("/ready", methods=["GET", "HEAD"])
async def ready(models: Annotated[ModelStore, Depends(get_models)], shutdown: Annotated[Shutdown, Depends(get_shutdown)]) -> JSONResponse:
    """200 once every model and variant configured for start-up is ready; 503 until then (or if
    one failed), and from the moment a shutdown begins (so a load balancer stops sending)."""
    body = models.readiness()
    if shutdown.draining:
        body = {**body, "status": "shutting_down"}
    return JSONResponse(body, status_code=200 if models.ready and not shutdown.draining else STATUS[Kind.NOT_READY])
