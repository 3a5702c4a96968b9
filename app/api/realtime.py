"""GET /v1/realtime: OpenAI's Realtime API, transcription sessions, over a WebSocket.

The openai SDK's `client.realtime.connect(model=...)` connects here: it turns the client's
`base_url` (`http://host:port/v1`) into `ws://host:port/v1/realtime?model=...` and sends the API
key as `Authorization: Bearer` (checked by app/auth.py's middleware before the handshake is
accepted). `?model=` names the session's first transcription model (any served `model:variant`);
`?intent=transcription` is accepted and is the only intent served. The session itself is
app/realtime.py's."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, WebSocket

from app.dependencies import get_realtime
from app.realtime import RealtimeHub

router = APIRouter(prefix="/v1")


@router.websocket("/realtime", name="realtime")
async def realtime(
    websocket: WebSocket,
    hub: Annotated[RealtimeHub, Depends(get_realtime)],
    model: str | None = None,
    intent: str | None = None,
) -> None:
    await hub.serve(websocket, model=model, intent=intent)
