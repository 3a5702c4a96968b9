"""Liveness and readiness probes."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from app.dependencies import get_models
from app.errors import STATUS
from optim.errors import Kind
from optim.models import ModelStore

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict:
    """The process is up and its event loop answers (it never waits on a model)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(models: Annotated[ModelStore, Depends(get_models)]) -> JSONResponse:
    """200 once every model and variant configured for start-up is ready; 503 until then (or if one failed)."""
    return JSONResponse(models.readiness(), status_code=200 if models.ready else STATUS[Kind.NOT_READY])
