"""Work for a client that has left stops: a request's transcription runs only while its client
is still connected. Once the body is read, the only message the server can still receive on
the request is `http.disconnect`, so waiting for it costs nothing."""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from starlette.requests import Request

from optim.errors import Kind, ServiceError

T = TypeVar("T")


class ClientDisconnected(ServiceError):
    """Answered with nginx's 499; nobody reads it, but the request counter counts it as 4xx."""

    kind = Kind.CLIENT_CLOSED
    code = "client_closed_request"

    def __init__(self):
        super().__init__("the client closed the connection before the transcript was ready")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; if the client disconnects first, `work` is cancelled (its queued windows
    leave the queue and its rows the running batch: optim/scheduler) and ClientDisconnected raised."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected()
    return task.result()
