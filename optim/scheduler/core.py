"""The scheduler between the shell and the engine: requests become windows, windows of all
waiting requests become batches, and batch results are put back together per request.

Stages of one request: admit (or refuse: queue full) → cut into windows (engine) → wait in the
queue of its (model reference, task) → run in a batch → a window whose result is not final goes
back to the queue (full context, or hotter), and so does the rest of a window the model
stopped short of (as openai-whisper's transcribe() seeks) → when every window is final, assemble.

A streamed request (`on_text`) is told its text as it becomes final, in audio order: each time
the windows before the earliest unfinished one are all final, the text they add (`on_text`'s
deltas joined are exactly the assembled transcript's `text`). Its first window is *leading*:
the policy runs it before the rest of the request's windows, so the first text comes early.

Which windows run together is the batching policy's choice (optim/scheduler/policy.py), asked
each time one of a model's workers is free. With `max_batch_size=1` nothing waits: every window
runs alone (batching off).

A model has `lanes` workers, each with its own thread, so that many of its batches run at once
(why, and how many: optim/scheduler/lanes.py); a short request then need not wait for a long
batch to finish. Each lane's batch gets `max_batch_audio / lanes`, so the working memory of all
running batches stays within the one budget. A batch with word timing runs alone on its model.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np
import torch

from optim.audio import SAMPLE_RATE
from optim.decoding import BatchStats
from optim.engine import WhisperEngine, assemble
from optim.errors import QueueFull
from optim.scheduler.lanes import LaneGate
from optim.scheduler.policy import POLICIES, Limits, PolicyName
from optim.types import ModelRef, Task, Timing, Transcript, TranscriptionOptions, Window, WindowResult

log = logging.getLogger(__name__)

QueueKey = tuple[ModelRef, Task]  # windows that can share a forward pass
DRAIN_WINDOW_S = 60.0  # Retry-After: the drain rate measured over this much recent time
MAX_RETRY_AFTER_S = 120


def drain_seconds(ahead: int, drained: list[tuple[float, int]], now: float, estimated_rate: float) -> int:
    """Whole seconds until `ahead` windows have drained, at the rate `drained` shows ((when,
    windows) of recent batches), or at `estimated_rate` windows a second before two batches have
    finished; at least 1 s, at most MAX_RETRY_AFTER_S."""
    if len(drained) >= 2:
        rate = sum(n for _, n in drained) / max(now - drained[0][0], 1.0)
    else:
        rate = estimated_rate
    return min(MAX_RETRY_AFTER_S, max(1, math.ceil(ahead / rate)))


@dataclass(eq=False)  # compared (and hashed) by identity
class _Request:
    key: QueueKey
    duration: float
    arrived: float
    outstanding: int  # windows not yet final (continuations add to it)
    done: asyncio.Future
    on_text: Callable[[str], None] | None = None  # streamed: told each delta of the final text, in order
    unfinished: list[float] = field(default_factory=list)  # streamed: offsets of the windows not yet final (queued or running)
    sent: str = ""  # the text told to on_text so far
    results: list[WindowResult] = field(default_factory=list)
    served: int = 0  # windows dispatched so far (fairness)
    first_dispatch: float | None = None
    batch_sizes: list[int] = field(default_factory=list)
    encoder_padding: list[float] = field(default_factory=list)
    decoder_padding: list[float] = field(default_factory=list)


@dataclass(eq=False)  # compared by identity
class _Pending:
    """A queued window (the policy's `Waiting`)."""

    request: _Request
    window: Window
    enqueued: float
    leading: bool = False  # a streamed request's first window (and its retries): runs before the rest

    @property
    def padded_seconds(self) -> float:
        return self.window.padded_seconds

    @property
    def served(self) -> int:
        return self.request.served


@dataclass
class SchedulerConfig:
    max_batch_size: int = 8
    max_wait: float = 0.05  # seconds a window may wait for others before a partial batch runs
    max_batch_audio: float = 240.0  # seconds of padded audio per batch (rows × longest window)
    max_queue: int = 64  # requests admitted (waiting or running); past it: QueueFull
    policy: PolicyName = "duration"
    shorten_context: bool = False  # encoder over each window's own length (≥15 s), not always 30 s
    lanes: int = 1  # batches of one model running at once, each on its own thread (lanes.py)
    alone_encoder_threads: int | None = None  # torch threads for the encoder of a batch that is all the work (lanes.py)

    @property
    def limits(self) -> Limits:
        return Limits(self.max_batch_size, self.max_wait, self.max_batch_audio / self.lanes)


class Scheduler:
    def __init__(self, engine: WhisperEngine, config: SchedulerConfig, on_batch: Callable[..., None] | None = None):
        self.engine = engine
        self.config = config
        self.policy = POLICIES[config.policy]()
        self.on_batch = on_batch  # (ModelRef, BatchStats, seconds): for metrics
        self._queues: dict[QueueKey, list[_Pending]] = defaultdict(list)
        self._admitted = 0
        self._wakeups: dict[str, asyncio.Event] = {}
        self._workers: dict[str, list[asyncio.Task]] = {}
        self._threads: dict[str, ThreadPoolExecutor] = {}  # a model's lanes run their batches here
        self._gates: dict[str, LaneGate] = {}
        self._seconds_per_window = 0.5  # running estimate of compute per window: fairness, Retry-After
        self._live: set[_Request] = set()  # admitted requests not yet answered (abort)
        self._leading_running: set[_Request] = set()  # a streamed request's first window is running: the rest waits
        self._running = 0  # batches running now, of every model: one that starts alone may borrow the idle cores
        self._refusal: Exception | None = None  # once aborted, what every new request gets
        self._drained: deque[tuple[float, int]] = deque()  # (when, windows) of recent batches: Retry-After

    # ---------------------------------------------------------------- requests
    @property
    def queued_windows(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def waiting_windows(self) -> dict[str, int]:
        """Windows waiting for a batch, per model."""
        per_model: dict[str, int] = defaultdict(int)
        for (ref, _), queue in list(self._queues.items()):
            per_model[ref.model] += len(queue)
        return dict(per_model)

    @property
    def admitted(self) -> int:
        """Requests admitted and not yet answered (waiting or running)."""
        return self._admitted

    async def transcribe(
        self,
        ref: ModelRef,
        samples: np.ndarray,
        options: TranscriptionOptions,
        on_text: Callable[[str], None] | None = None,
        on_queued: Callable[[], None] | None = None,
    ) -> tuple[Transcript, Timing]:
        """The transcript of `samples`, and how its windows were scheduled. With `on_text` the
        request is streamed: `on_text` is called (on the event loop) with each piece of the final
        text as soon as it and all the audio before it are final; the pieces joined are the
        transcript's `text`. `on_queued` is called once the request is admitted, its model loaded
        and its windows queued (it is not called for audio that needs no model: silence)."""
        if self._refusal is not None:
            raise self._refusal
        if self._admitted >= self.config.max_queue:
            raise QueueFull(self.retry_after())
        self._admitted += 1
        try:
            return await self._transcribe(ref, samples, options, on_text, on_queued)
        finally:
            self._admitted -= 1

    async def _transcribe(
        self,
        ref: ModelRef,
        samples: np.ndarray,
        options: TranscriptionOptions,
        on_text: Callable[[str], None] | None,
        on_queued: Callable[[], None] | None,
    ) -> tuple[Transcript, Timing]:
        arrived = time.perf_counter()
        await self.engine.ensure_loaded(ref, options)
        duration = len(samples) / SAMPLE_RATE
        if self.engine.is_silent(samples):
            return assemble(ref, options.task, duration, []), Timing()
        windows = await asyncio.to_thread(self.engine.windows, ref, samples, options)
        loop = asyncio.get_running_loop()
        request = _Request(
            (ref, options.task), duration, arrived, len(windows), loop.create_future(), on_text,
            [w.offset for w in windows] if on_text is not None else [],
        )
        now = time.perf_counter()
        self._queues[request.key] += [_Pending(request, w, now, leading=on_text is not None and i == 0) for i, w in enumerate(windows)]
        self._live.add(request)
        self._wake(ref.model)
        if on_queued is not None:
            on_queued()
        try:
            await request.done
        except asyncio.CancelledError:  # client gone: its windows leave the queue, its rows the batch
            self._queues[request.key] = [p for p in self._queues[request.key] if p.request is not request]
            raise
        finally:
            self._live.discard(request)
        finished = time.perf_counter()
        timing = Timing(
            queue_seconds=request.first_dispatch - arrived,
            compute_seconds=finished - request.first_dispatch,
            batch_size=float(np.mean(request.batch_sizes)),
            encoder_padding=float(np.mean(request.encoder_padding)),
            decoder_padding=float(np.mean(request.decoder_padding)),
        )
        return assemble(ref, options.task, duration, sorted(request.results, key=lambda r: r.offset)), timing

    def abort(self, error: Exception) -> int:
        """Fail every admitted request with `error`, and every later one (shutdown past its
        deadline); how many were failed."""
        self._refusal = error
        live = [r for r in self._live if not r.done.done()]
        for request in live:
            request.done.set_exception(error)
        return len(live)

    def retry_after(self) -> int:
        """Seconds until the work ahead of a new request has drained, at the rate windows
        actually finished over the last minute (the estimate per window before any finished):
        a client that waits this long finds room, rather than retrying into a full queue."""
        now = time.perf_counter()
        while self._drained and now - self._drained[0][0] > DRAIN_WINDOW_S:
            self._drained.popleft()
        ahead = self.queued_windows + self.config.max_batch_size * self.config.lanes  # + what is running now
        return drain_seconds(ahead, list(self._drained), now, 1 / self._seconds_per_window)

    # ---------------------------------------------------------------- batching
    def _wake(self, model_id: str) -> None:
        if model_id not in self._workers:
            lanes = self.config.lanes
            self._wakeups[model_id] = asyncio.Event()
            # Each lane sets its torch threads itself, as the event loop's (create_app's lane plan):
            # a thread otherwise takes torch's global count at its first op, which a lane lending
            # its encoder the idle cores (decoding.torch_threads) changes for a moment.
            self._threads[model_id] = ThreadPoolExecutor(
                max_workers=lanes, thread_name_prefix=f"whisper-{model_id}", initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),)
            )
            self._gates[model_id] = LaneGate()
            self._workers[model_id] = [
                asyncio.create_task(self._worker(model_id), name=f"scheduler-{model_id}-{lane}") for lane in range(lanes)
            ]
        self._wakeups[model_id].set()

    async def close(self) -> None:
        tasks = [t for lanes in self._workers.values() for t in lanes]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for threads in self._threads.values():
            threads.shutdown(wait=False, cancel_futures=True)

    def choose(self, model_id: str, now: float) -> tuple[list[_Pending], float | None]:
        """The policy's next batch for a model's worker, or ([], seconds to wait) when it should wait
        for more windows (None: nothing is queued)."""
        for key in [k for k in self._queues if k[0].model == model_id]:  # drop windows of failed requests
            self._queues[key] = [p for p in self._queues[key] if not p.request.done.done()]
        queues = {k: q for k, q in self._queues.items() if k[0].model == model_id}
        choice = self.policy.choose(queues, now, self.config.limits, self._seconds_per_window, self._leading_running)
        return choice.batch, choice.wait

    async def _worker(self, model_id: str) -> None:
        wakeup = self._wakeups[model_id]
        while True:
            batch, wait = self.choose(model_id, time.perf_counter())
            if not batch:
                wakeup.clear()
                try:
                    await asyncio.wait_for(wakeup.wait(), timeout=wait)
                except asyncio.TimeoutError:
                    pass
                continue
            key = batch[0].request.key
            chosen = {id(p) for p in batch}
            self._queues[key] = [p for p in self._queues[key] if id(p) not in chosen]
            leads = {p.request for p in batch if p.leading}
            self._leading_running |= leads
            try:
                await self._dispatch(model_id, key, batch)
            finally:
                self._leading_running -= leads
                if leads:
                    wakeup.set()  # their other windows (or the leading window's retry) may run now, in any lane

    async def _dispatch(self, model_id: str, key: QueueKey, batch: list[_Pending]) -> None:
        """Run a chosen batch in a lane and deliver its results."""
        gate = self._gates[model_id]
        await gate.enter(alone=any(p.window.word_timestamps for p in batch))
        # Only a batch that is all the work there is borrows the idle cores: no other batch running
        # and no other request admitted (one that is may start a batch during the encoder, and
        # oversubscribed cores cost realtime sessions more than the borrowing saved: p95 end of
        # turn at 8 sessions 3.3 → 4.7-6.3 s when every batch that started alone borrowed).
        sole = self._running == 0 and self._admitted == len({id(p.request) for p in batch})
        encoder_threads = self.config.alone_encoder_threads if sole else None
        self._running += 1
        started = time.perf_counter()
        for p in batch:
            p.request.served += 1
            if p.request.first_dispatch is None:
                p.request.first_dispatch = started
        try:
            try:
                results, stats = await self._run(model_id, key, batch, encoder_threads)
            except Exception:  # one bad row must not fail its batch-mates: each runs again alone
                log.exception("batch of %d windows on %s failed; running them one by one", len(batch), key)
                await self._run_alone(model_id, key, batch)
                return
        finally:
            self._running -= 1
            await gate.leave()
        self._finished(key, batch, results, stats, time.perf_counter() - started)

    async def _run(
        self, model_id: str, key: QueueKey, batch: list[_Pending], encoder_threads: int | None = None
    ) -> tuple[list[WindowResult], BatchStats]:
        return await asyncio.get_running_loop().run_in_executor(
            self._threads[model_id],
            partial(
                self.engine.run_batch,
                *key,
                [p.window for p in batch],
                self.config.shorten_context,
                [p.request.done.done for p in batch],  # a row nobody waits for leaves the batch
                encoder_threads=encoder_threads,
            ),
        )

    async def _run_alone(self, model_id: str, key: QueueKey, batch: list[_Pending]) -> None:
        """After a failed batch: each window alone, so only the window that fails fails its request."""
        for p in batch:
            if p.request.done.done():
                continue
            started = time.perf_counter()
            try:
                results, stats = await self._run(model_id, key, [p])
            except Exception as e:  # a failed window fails its request, never the worker
                log.exception("window at %.1f s of a request on %s failed", p.window.offset, key)
                if not p.request.done.done():
                    p.request.done.set_exception(e)
                continue
            self._finished(key, [p], results, stats, time.perf_counter() - started)

    def _finished(self, key: QueueKey, batch: list[_Pending], results: list[WindowResult], stats: BatchStats, seconds: float) -> None:
        self._seconds_per_window = 0.8 * self._seconds_per_window + 0.2 * seconds / len(batch)
        self._drained.append((time.perf_counter(), len(batch)))
        if self.on_batch:
            self.on_batch(key[0], stats, seconds)
        self._deliver(batch, results, stats)

    def _deliver(self, batch: list[_Pending], results: list[WindowResult], stats: BatchStats) -> None:
        now = time.perf_counter()
        for p, result in zip(batch, results):
            request = p.request
            request.batch_sizes.append(stats.batch_size)
            request.encoder_padding.append(stats.encoder_padding)
            request.decoder_padding.append(stats.decoder_padding)
            if request.done.done():
                continue  # cancelled meanwhile
            streamed = request.on_text is not None
            if streamed:
                request.unfinished.remove(p.window.offset)
            if result.retry is not None:  # not final: back in the queue
                self._queues[request.key].append(_Pending(request, result.retry, now, leading=p.leading))
                if streamed:
                    request.unfinished.append(result.retry.offset)
                continue
            request.results.append(result)
            request.outstanding -= 1
            if result.rest is not None:  # the model stopped early: the rest of the window goes again
                self._queues[request.key].append(_Pending(request, result.rest, now))
                request.outstanding += 1
                if streamed:
                    request.unfinished.append(result.rest.offset)
            if streamed:
                self._stream(request)
            if request.outstanding == 0:
                request.done.set_result(None)

    @staticmethod
    def _stream(request: _Request) -> None:
        """Tell a streamed request the text its final prefix adds: the windows before its earliest
        unfinished one (a later result always starts after it: continuations start past their
        window, retries where it starts). Stripped as `assemble` strips the whole text, so the
        deltas joined are exactly the transcript's `text`: what is left out at the end (spaces)
        comes with the next delta, if any text follows it."""
        frontier = min(request.unfinished, default=math.inf)
        final = [r for r in sorted(request.results, key=lambda r: r.offset) if r.offset < frontier]
        text = "".join(s["text"] for r in final for s in r.segments).strip()
        if len(text) <= len(request.sent):
            return
        if not text.startswith(request.sent):  # cannot happen (see above); never retract what was sent
            log.error("a streamed request's final text changed under what was sent")
            return
        delta, request.sent = text[len(request.sent) :], text
        try:
            request.on_text(delta)
        except Exception:  # the listener's failure is its own, never the worker's
            log.exception("a streamed request's on_text failed")
