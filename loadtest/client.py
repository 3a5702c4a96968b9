"""The HTTP side: a closed-loop load generator over httpx, the warm-up, and /metrics scrapes.

Closed loop: C workers each send one request, wait for its answer, then take the next item
of the shared workload, so at most C requests are in flight and the offered load follows the
server's own pace (no queue explodes at the client, latency is the server's).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from loadtest.workload import WorkItem

REQUEST_TIMEOUT_S = 600.0
TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"
ERROR_BODY_LIMIT = 500  # characters of a failed response kept for the report


@dataclass
class RequestResult:
    id: str
    status: int | None  # None: no HTTP answer at all (connection refused, timeout)
    latency_s: float
    duration_s: float
    text: str | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.text is not None


@dataclass
class RunOutcome:
    results: list[RequestResult]  # in completion order
    wall_s: float


def new_client(
    base_url: str, concurrency: int, timeout: float = REQUEST_TIMEOUT_S, api_key: str | None = None
) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max(concurrency, 1) + 2, max_keepalive_connections=max(concurrency, 1) + 2)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    return httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits, headers=headers)


async def transcribe(client: httpx.AsyncClient, item: WorkItem, model_name: str) -> tuple[RequestResult, httpx.Response | None]:
    """One transcription request with the clip's original bytes; the latency is wall time to the full answer."""
    form = {"model": model_name, "language": "en", "response_format": "json"}
    if item.reference is not None:  # the server scores it too: its WER metrics get real data
        form["reference"] = item.reference
    started = time.perf_counter()
    try:
        response = await client.post(TRANSCRIPTIONS_PATH, data=form, files={"file": (item.filename, item.audio)})
    except httpx.HTTPError as e:
        latency = time.perf_counter() - started
        return RequestResult(item.id, None, latency, item.duration, None, f"{type(e).__name__}: {e}"), None
    latency = time.perf_counter() - started
    if response.status_code != 200:
        return RequestResult(
            item.id, response.status_code, latency, item.duration, None, response.text[:ERROR_BODY_LIMIT]
        ), response
    try:
        text = response.json()["text"]
    except (ValueError, KeyError, TypeError) as e:
        return RequestResult(
            item.id, 200, latency, item.duration, None, f"unreadable answer ({e}): {response.text[:ERROR_BODY_LIMIT]}"
        ), response
    return RequestResult(item.id, 200, latency, item.duration, text, None), response


async def run_closed_loop(
    client: httpx.AsyncClient,
    items: list[WorkItem],
    model_name: str,
    concurrency: int,
    on_done: Callable[[RequestResult], None] = lambda result: None,
) -> RunOutcome:
    """Send every item once, `concurrency` at a time; the wall time runs from the first send to the last answer."""
    pending = iter(items)  # shared by the workers; safe because they all run on one event loop
    results: list[RequestResult] = []

    async def worker() -> None:
        for item in pending:
            result, _ = await transcribe(client, item, model_name)
            results.append(result)
            on_done(result)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(items)))))
    return RunOutcome(results, time.perf_counter() - started)


async def warm_up(client: httpx.AsyncClient, items: list[WorkItem], model_name: str) -> str | None:
    """Send the warm-up requests together (so a batching server warms its batched path too).

    Returns the `model:variant` the server says it used (`X-Model`), which names the metric
    labels of this variant, or None if the server does not say. Raises if a warm-up fails:
    a configuration that cannot answer two requests is not worth measuring.
    """
    answers = await asyncio.gather(*(transcribe(client, item, model_name) for item in items))
    for result, _ in answers:
        if not result.ok:
            raise RuntimeError(f"warm-up request for {model_name} failed: status {result.status}: {result.error}")
    return next((response.headers.get("x-model") for _, response in answers if response is not None), None)


async def scrape_metrics(client: httpx.AsyncClient) -> str | None:
    """The /metrics text, or None when the server has no such endpoint (or cannot answer it)."""
    try:
        response = await client.get("/metrics", timeout=30)
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None
