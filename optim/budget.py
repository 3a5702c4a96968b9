"""The decoded audio held in memory at once, across all requests: one budget, so that many
concurrent long uploads (or decompression bombs, a few KB of FLAC that decode to hours) cannot
together exhaust memory, whatever each one's own duration limit allows.

A request holds a share from the moment its upload starts decoding until its transcript is
assembled. The decoder asks for more as its buffer grows (`Share.grow`), so a refused request
stops decoding at once and has cost only what it decoded so far."""

from __future__ import annotations

import threading
from typing import Callable

from optim.audio import SAMPLE_RATE
from optim.errors import Kind, ServiceError

# What a second of audio costs while a request is in flight: its float32 samples (4 B × 16 kHz)
# and its windows' log-mel frames (80 bins × 100 frames × 4 B).
BYTES_PER_SECOND = 4 * SAMPLE_RATE + 80 * 100 * 4


class AudioBudgetFull(ServiceError):
    kind = Kind.OVERLOADED
    code = "server_overloaded"

    def __init__(self, capacity_seconds: float, retry_after: int):
        super().__init__(
            f"the server holds its limit of {capacity_seconds:g} s of decoded audio (setting MAX_PENDING_AUDIO_SECONDS); "
            f"retry in {retry_after} s",
            None,
            retry_after,
        )


class AudioBudget:
    def __init__(self, capacity_seconds: float, retry_after: Callable[[], int] = lambda: 5):
        self.capacity_seconds = capacity_seconds
        self.capacity = int(capacity_seconds * SAMPLE_RATE)  # samples
        self.retry_after = retry_after
        self.held = 0  # samples, all shares together
        self._lock = threading.Lock()

    @property
    def held_seconds(self) -> float:
        return self.held / SAMPLE_RATE

    def share(self) -> "Share":
        return Share(self)

    def _take(self, samples: int) -> None:
        with self._lock:
            if self.held + samples > self.capacity:
                raise AudioBudgetFull(self.capacity_seconds, self.retry_after())
            self.held += samples

    def _give_back(self, samples: int) -> None:
        with self._lock:
            self.held -= samples


class Share:
    """One request's part of the budget: a context manager; leaving it gives everything back,
    and a decoder still running after that (its client left) is stopped at its next `grow`."""

    def __init__(self, budget: AudioBudget):
        self.budget = budget
        self.samples = 0
        self.closed = False
        self._lock = threading.Lock()

    def grow(self, total: int) -> None:
        """Hold `total` samples in all (called from the decoding thread as its buffer grows);
        AudioBudgetFull when the budget has no room for the difference."""
        with self._lock:
            if self.closed:
                raise AudioBudgetFull(self.budget.capacity_seconds, self.budget.retry_after())
            if total > self.samples:
                try:
                    self.budget._take(total - self.samples)
                except AudioBudgetFull:  # this request is refused: its part goes back at once, for the others
                    self.closed = True
                    self.budget._give_back(self.samples)
                    self.samples = 0
                    raise
                self.samples = total

    def __enter__(self) -> "Share":
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self.closed = True
            self.budget._give_back(self.samples)
            self.samples = 0
