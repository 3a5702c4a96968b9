"""Shutdown with a drain phase, so that a load balancer stops sending before the listener
closes and no request is cut off without an answer.

On SIGTERM (app/__main__.py):
1. at once: `/ready` answers 503 and new transcription requests get 503 `shutting_down` with
   Retry-After, while the socket stays open for SHUTDOWN_DRAIN_S (time for the load balancer
   to see the failing probe and route elsewhere);
2. then the listener closes; requests already admitted go on;
3. SHUTDOWN_TIMEOUT_S after the signal, whatever is still running gets a 503 `shutting_down`
   rather than a reset, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Callable

from optim.errors import Kind, ServiceError

log = logging.getLogger(__name__)


class ShuttingDown(ServiceError):
    kind = Kind.NOT_READY
    code = "shutting_down"

    def __init__(self, retry_after: int):
        super().__init__("the server is shutting down; retry on another instance", None, retry_after)


class Shutdown:
    def __init__(self, drain_s: float, timeout_s: float, abort: Callable[[ServiceError], int]):
        self.drain_s = drain_s
        self.timeout_s = max(timeout_s, drain_s)
        self.abort = abort  # fails every admitted request with the error (the scheduler's)
        self.began: float | None = None
        self._task: asyncio.Task | None = None

    @property
    def draining(self) -> bool:
        return self.began is not None

    def check(self) -> None:
        """Refuse a new request once the drain has begun."""
        if self.began is not None:
            raise self.error()

    def error(self) -> ShuttingDown:
        return ShuttingDown(max(1, math.ceil(self.drain_s)))

    def begin(self, stop_listening: Callable[[], None]) -> None:
        """Start the drain (on the event loop); `stop_listening` closes the listener."""
        if self.began is None:
            self.began = time.monotonic()
            self._task = asyncio.get_running_loop().create_task(self._drain(stop_listening), name="shutdown-drain")

    async def _drain(self, stop_listening: Callable[[], None]) -> None:
        log.warning("shutting down: draining for %g s, in-flight requests have %g s", self.drain_s, self.timeout_s)
        await asyncio.sleep(self.drain_s)
        stop_listening()
        await asyncio.sleep(self.timeout_s - self.drain_s)
        failed = self.abort(self.error())
        if failed:
            log.warning("shutdown deadline: %d request(s) answered 503 shutting_down", failed)
