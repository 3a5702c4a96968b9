"""GET /v1/models: what a request may name."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from app.dependencies import get_service
from app.service import TranscriptionService

router = APIRouter(prefix="/v1/models", tags=["models"])

CREATED = 1_700_000_000  # fixed: the API shape wants a timestamp, not a changing one


def _card(model_id: str, service: TranscriptionService) -> dict:
    card = {"id": model_id, "object": "model", "created": CREATED, "owned_by": "whisper-serve"}
    reason = service.unavailable(model_id)
    if reason is not None:  # listed so clients see it exists, with what it takes to serve it
        card |= {"available": False, "unavailable_reason": reason}
    return card


@router.get("")
async def list_models(service: Annotated[TranscriptionService, Depends(get_service)]) -> dict:
    return {"object": "list", "data": [_card(m, service) for m in service.model_ids()]}


@router.get("/{model_id:path}")
async def retrieve_model(model_id: str, service: Annotated[TranscriptionService, Depends(get_service)]) -> dict:
    if model_id not in service.model_ids():
        raise service.models.unknown(model_id)
    return _card(model_id, service)
