"""Lanes: how many batches of one model run at once, and torch's threads in each.

On a CPU, two batches of one torch thread each do more than one batch of two threads. A
decoder step is many small matrix products, which do not split well over cores (measured on
this project's 2-core machine, base int8+flash: one thread decodes faster than two even alone),
and while one lane runs Python between kernels the other lane's core stays busy. On a GPU one
lane keeps the device's work in order; more would only interleave kernels.

The encoder is the exception: its products are large (1500 rows per 30-s window) and split
well, 0.72 → 0.40 s for one 30-s window of base int8 on two threads here. So a batch that is
all the work there is (no other batch running, no other request admitted) borrows the idle
lanes' cores for its encoder (`SchedulerConfig.alone_encoder_threads`, `decoding.torch_threads`):
a lone request, and a streamed request's first window, which runs while the rest of its file
waits. Borrowing whenever no other batch ran was worse under load: another lane's batch started
during the encoder, three threads on two cores (benchmarks/encoder_threads_ab/).
"""

from __future__ import annotations

import asyncio
import os


def cpu_count() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def plan(device: str, cores: int, lanes: int | None = None, threads: int | None = None) -> tuple[int, int]:
    """(lanes, torch threads per lane) for a resolved `device` ("cpu", "cuda") on `cores` cores;
    a given value is kept. CPU: two lanes when there are two cores or more, the cores shared
    between them. GPU: one lane, torch's threads for the host-side work on all cores."""
    if lanes is None:
        lanes = 2 if device == "cpu" and cores >= 2 else 1
    if threads is None:
        threads = max(1, cores // lanes) if device == "cpu" else cores
    return lanes, threads


class LaneGate:
    """The batches running on one model: any number share it, and one that asks to be alone
    (word timing: openai-whisper's installs hooks on the model and turns its SDPA off while it
    runs) waits for the others to finish, and holds the rest back until it has. From the
    moment it waits, not only while it runs: a lane that kept taking new batches would otherwise
    keep the count above zero, and a word-timing request could wait for the queue to drain.
    Event loop only."""

    def __init__(self) -> None:
        self.running = 0
        self.alone = False
        self.waiting_alone = 0
        self._changed = asyncio.Condition()

    async def enter(self, alone: bool) -> None:
        async with self._changed:
            if alone:
                self.waiting_alone += 1
                try:
                    await self._changed.wait_for(lambda: not self.alone and self.running == 0)
                finally:
                    self.waiting_alone -= 1
                    self._changed.notify_all()  # (if it gave up waiting, the ones it held back may go)
            else:
                await self._changed.wait_for(lambda: not self.alone and not self.waiting_alone)
            self.running += 1
            self.alone = alone

    async def leave(self) -> None:
        async with self._changed:
            self.running -= 1
            self.alone = False
            self._changed.notify_all()
