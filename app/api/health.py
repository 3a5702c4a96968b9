"""Liveness and readiness probes."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from app.dependencies import get_service
from app.service import TranscriptionService

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict:
    """The process is up and its event loop answers (it never waits on a model)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(service: Annotated[TranscriptionService, Depends(get_service)]) -> JSONResponse:
    """200 once every model configured for start-up is loaded; 503 until then (or if one failed)."""
    loaded = service.engine.loaded
    built = {(b.model_id, b.variant) for b in service.engine.variant_cache.built()}
    body = {
        "status": "ready" if service.ready else "failed" if service.engine.load_errors else "loading",
        "models": {m: ("loaded" if m in loaded else "failed" if m in service.engine.load_errors else "loading") for m in service.preload},
        "variants": {f"{m}:{v}": ("built" if (m, v) in built else "building") for m, v in service.preload_variants},
        "load_seconds": {m: round(loaded[m].load_seconds, 2) for m in service.preload if m in loaded},
        "errors": service.engine.load_errors,
    }
    return JSONResponse(body, status_code=200 if service.ready else 503)
