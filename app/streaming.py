"""Streamed transcripts: `stream=true` on POST /v1/audio/transcriptions, answered as OpenAI's
server-sent events, which the official SDK's `transcriptions.create(..., stream=True)` iterates.

    data: {"type": "transcript.text.delta", "delta": "..."}      as text becomes final, in audio order
    data: {"type": "transcript.text.done", "text": "...", "usage": {...}}   once, at the end
    data: {"type": "error", "error": {"message", "type", "param", "code"}}  instead, if it fails

Everything that can be refused is refused before the stream starts, with its HTTP status and
OpenAI's error body: the form, the model, the upload (read and decoded), admission to the
scheduler (503 + Retry-After), loading the model. `open_stream` returns only once the request's
windows are queued; what fails after that (a window that cannot be decoded, a shutdown past its
deadline) is an `error` event, which the SDK raises as `openai.APIError`, and the stream ends.

The deltas are the scheduler's (optim/scheduler/core.py): a window's text once the fallback has
made it final and every window before it is final too, so they are append-only and joined they
are exactly the `done` text, which is the non-streamed `json` text. A client that goes away
mid-stream cancels the transcription (its queued windows leave the queue, its rows the batch).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Any, AsyncIterator

from fastapi import Request, UploadFile
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from app.errors import CLIENT_CLOSED, INTERNAL_ERROR, STATUS, error_body
from app.service import TranscriptionService
from optim.errors import ServiceError
from optim.types import ModelRef, Outcome, TranscriptionOptions

log = logging.getLogger(__name__)

MEDIA_TYPE = "text/event-stream"
KEEPALIVE_S = 15.0  # an SSE comment when no event came for this long: proxies keep the connection
AUDIO_TOKENS_PER_SECOND = 50  # Whisper's encoder positions: 1,500 per 30-s window
FINAL_STATUS = "final_status"  # request.state: how a started stream ended, for the request counter


def sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


def delta_event(delta: str) -> dict[str, Any]:
    return {"type": "transcript.text.delta", "delta": delta}


def usage(outcome: Outcome, prompt_tokens: int) -> dict[str, Any]:
    """The `done` event's usage, in the shape OpenAI's SDK declares for it (tokens): the text
    tokens of the transcript as output; as input, the audio's encoder positions (50 per second)
    and the prompt's tokens."""
    audio = math.ceil(outcome.transcript.duration * AUDIO_TOKENS_PER_SECOND)
    output = sum(len(s.tokens) for s in outcome.transcript.segments)
    return {
        "type": "tokens",
        "input_tokens": audio + prompt_tokens,
        "output_tokens": output,
        "total_tokens": audio + prompt_tokens + output,
        "input_token_details": {"audio_tokens": audio, "text_tokens": prompt_tokens},
    }


def done_event(outcome: Outcome, prompt_tokens: int) -> dict[str, Any]:
    return {"type": "transcript.text.done", "text": outcome.transcript.text, "usage": usage(outcome, prompt_tokens)}


def error_event(error: BaseException) -> tuple[int, dict[str, Any]]:
    """(the status the error would have had, its `error` event)."""
    if isinstance(error, ServiceError):
        status = STATUS[error.kind]
        body = error_body(status, error.message, error.code, error.param)
    else:
        status = INTERNAL_ERROR
        body = error_body(status, "internal error; the server logged the details", "internal_error")
    return status, {"type": "error", **body}


class TranscriptStream:
    """A transcription admitted and queued, its text still coming: `events()` as SSE bytes."""

    def __init__(self, service: TranscriptionService, ref: ModelRef, options: TranscriptionOptions, started: float):
        self.service, self.ref, self.options, self.started = service, ref, options, started
        self._items: asyncio.Queue[str | asyncio.Task] = asyncio.Queue()  # deltas, then the finished task
        self._task: asyncio.Task | None = None

    async def open(self, file: UploadFile, reference: str | None) -> None:
        """Read, decode, admit and queue; raises what refuses the request (before any event)."""
        queued = asyncio.get_running_loop().create_future()

        def on_queued() -> None:
            if not queued.done():
                queued.set_result(None)

        self._task = task = asyncio.ensure_future(
            self.service.transcribe(file, self.ref, self.options, reference, on_text=self._items.put_nowait, on_queued=on_queued)
        )
        task.add_done_callback(self._items.put_nowait)  # after every delta: they are put before the request finishes
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, also when nobody reads the end
        try:
            await asyncio.wait({task, queued}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the client left before the stream started (app/disconnect.py)
            self.close()
            raise
        if task.done() and (task.cancelled() or task.exception() is not None):
            task.result()  # raises it: answered with its status

    def close(self) -> None:
        """Stop the transcription if it still runs (the client left): its windows leave the queue."""
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def events(self, request: Request) -> AsyncIterator[bytes]:
        getter: asyncio.Future | None = None
        first = True
        try:
            while True:
                getter = getter or asyncio.ensure_future(self._items.get())
                done, _ = await asyncio.wait({getter}, timeout=KEEPALIVE_S)
                if not done:
                    yield b": keep-alive\n\n"
                    continue
                item, getter = getter.result(), None
                if isinstance(item, str):
                    if first:
                        first = False
                        self.service.metrics.stream_first_delta_seconds.labels(self.ref.model, str(self.ref.variant)).observe(
                            time.perf_counter() - self.started
                        )
                    yield sse(delta_event(item))
                    continue
                if item.cancelled():
                    return
                if item.exception() is not None:
                    error = item.exception()
                    if not isinstance(error, ServiceError):
                        log.error("a streamed transcription failed", exc_info=error)
                    status, event = error_event(error)
                    setattr(request.state, FINAL_STATUS, status)
                    yield sse(event)
                    return
                prompt = len(self.service.engine.prompt_tokens(self.ref, self.options)) if self.options.prompt else 0
                yield sse(done_event(item.result(), prompt))
                return
        except asyncio.CancelledError:  # the client went away (Starlette stops the response on http.disconnect)
            setattr(request.state, FINAL_STATUS, CLIENT_CLOSED)
            raise
        finally:
            if getter is not None:
                getter.cancel()
            self.close()

    def response(self, request: Request) -> StreamingResponse:
        headers = {
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: pass each event on at once
            "X-Model": f"{self.ref.model}:{self.ref.variant}",
        }
        # The background task runs even when the client left before the first event was sent.
        return StreamingResponse(self.events(request), media_type=MEDIA_TYPE, headers=headers, background=BackgroundTask(self.close))


async def open_stream(
    service: TranscriptionService, file: UploadFile, ref: ModelRef, options: TranscriptionOptions, reference: str | None
) -> TranscriptStream:
    """A streamed transcription, once admitted and queued (errors before that are raised)."""
    stream = TranscriptStream(service, ref, options, time.perf_counter())
    await stream.open(file, reference)
    return stream
