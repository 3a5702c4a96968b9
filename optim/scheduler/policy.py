"""Which windows run together next: the batching policy, a pure function of the queues and the
clock (no event loop, no model), so it is unit-tested on hand-made queues.

Each time a model's worker is free the scheduler asks `choose` for the next batch:

* the *seed* is, among the windows that have waited past `max_wait` (else, among the queues
  that already hold a full batch), the one of highest priority (lowest value); otherwise the
  answer is to wait, until the oldest window's deadline;
* the batch is filled from the seed's queue with the candidates the policy prefers, up to
  `max_batch_size` windows and `max_batch_audio` seconds of padded audio (rows × longest).

A *leading* window (the first window of a streamed request: its text is the first the client
sees) goes in a batch before the rest of its request's windows: while it waits, and while it
runs (the scheduler says which requests' leading windows are running), they are held back, so it
is never batched with them (it still may be with other requests' windows) and, with lanes, they
do not run beside it and slow it down. A streamed 5-minute file's first text then costs one
window's decoding, not a full batch's.

Policies differ in two orders. `fifo` (the baseline): arrival, both for the seed and the fill.
`duration`: the seed by fair-queueing priority, a window's enqueue time plus the compute its
request already had (windows served × seconds per window), so a short request is not held behind
every window of a long file and the long file still advances; the fill by nearness in duration,
so a batch wastes little of its encoder work on padding.

Adding a policy: subclass `BatchPolicy`, override `priority` and/or `affinity`, add it to `POLICIES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AbstractSet, Hashable, Literal, Mapping, Protocol, Sequence, TypeVar

PolicyName = Literal["duration", "fifo"]


class Waiting(Protocol):
    """A window waiting in a queue, as the policy sees it."""

    @property
    def padded_seconds(self) -> float: ...  # audio it costs in a batch (30 s when it needs the full context)

    @property
    def enqueued(self) -> float: ...  # when it joined the queue (the scheduler's clock)

    @property
    def served(self) -> int: ...  # windows its request has had dispatched so far

    @property
    def request(self) -> Hashable: ...  # the request it belongs to (its identity)

    @property
    def leading(self) -> bool: ...  # runs before the rest of its request's windows (a stream's first text)


@dataclass(frozen=True, eq=False)
class QueuedWindow:
    """A plain `Waiting`: what tests and tools build by hand (each its own request unless told)."""

    padded_seconds: float
    enqueued: float
    served: int = 0
    request: Hashable = field(default_factory=object)
    leading: bool = False


@dataclass(frozen=True)
class Limits:
    max_batch_size: int = 8
    max_wait: float = 0.05  # seconds a window may wait for others before a partial batch runs
    max_batch_audio: float = 240.0  # seconds of padded audio per batch (rows × longest window)


K = TypeVar("K", bound=Hashable)
W = TypeVar("W", bound=Waiting)


@dataclass(frozen=True)
class Choice:
    """A batch from one queue, or none and how long to wait (None: nothing is queued)."""

    key: Hashable | None
    batch: list
    wait: float | None = 0.0


class BatchPolicy:
    name = "base"

    def priority(self, w: Waiting, seconds_per_window: float) -> float:
        """Lower goes first: the seed among the windows that may run."""
        return w.enqueued

    def affinity(self, seed: Waiting, w: Waiting, seconds_per_window: float) -> tuple:
        """Lower joins the seed's batch first."""
        return (w.enqueued,)

    def choose(
        self, queues: Mapping[K, Sequence[W]], now: float, limits: Limits, seconds_per_window: float,
        leading_running: AbstractSet[Hashable] = frozenset(),
    ) -> Choice:
        """`leading_running`: the requests whose leading window is in a running batch."""
        held = _held(queues) | leading_running  # behind their leading window: not candidates yet
        queues = {k: [w for w in q if w.leading or w.request not in held] for k, q in queues.items()}
        queues = {k: q for k, q in queues.items() if q}
        pending = [w for q in queues.values() for w in q]
        if not pending:
            return Choice(None, [], None)
        overdue = [(k, w) for k, q in queues.items() for w in q if now - w.enqueued >= limits.max_wait]
        full = [(k, w) for k, q in queues.items() if len(q) >= limits.max_batch_size for w in q]
        if not (overdue or full):
            return Choice(None, [], max(0.0, min(w.enqueued for w in pending) + limits.max_wait - now))
        key, seed = min(overdue or full, key=lambda kw: self.priority(kw[1], seconds_per_window))
        candidates = sorted((w for w in queues[key] if w is not seed), key=lambda w: self.affinity(seed, w, seconds_per_window))
        batch, longest = [seed], seed.padded_seconds
        for w in candidates:
            if len(batch) >= limits.max_batch_size:
                break
            if (len(batch) + 1) * max(longest, w.padded_seconds) <= limits.max_batch_audio:
                batch.append(w)
                longest = max(longest, w.padded_seconds)
        return Choice(key, batch)


def _held(queues: Mapping[K, Sequence[W]]) -> set[Hashable]:
    """The requests with a leading window waiting: their other windows wait until it has run."""
    return {w.request for q in queues.values() for w in q if w.leading}


class FifoPolicy(BatchPolicy):
    """Arrival order for the seed and the fill: the baseline."""

    name = "fifo"


class DurationPolicy(BatchPolicy):
    """Fair-queueing seed; the fill by nearness in duration (then priority)."""

    name = "duration"

    def priority(self, w: Waiting, seconds_per_window: float) -> float:
        return w.enqueued + w.served * seconds_per_window

    def affinity(self, seed: Waiting, w: Waiting, seconds_per_window: float) -> tuple:
        return (abs(w.padded_seconds - seed.padded_seconds), self.priority(w, seconds_per_window))


POLICIES: dict[str, type[BatchPolicy]] = {p.name: p for p in (DurationPolicy, FifoPolicy)}
