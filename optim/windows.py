"""Long audio cut into ≤30-s windows at pauses, so that windows can be decoded independently
(and batched with other requests' windows) without cutting through words.

openai-whisper's `transcribe()` walks the audio sequentially and restarts each window at the
previous one's last timestamp, which makes window k depend on window k−1. Here the cut points
are chosen up front from the signal alone: within the last part of each 30-s span, the cut
goes where the short-time energy (smoothed over 200 ms) is lowest, that is, in a pause.
"""

from __future__ import annotations

import numpy as np

from optim.audio import SAMPLE_RATE

FRAME = 160  # 10 ms: one mel frame, so cuts fall on mel-frame boundaries
MAX_WINDOW_SECONDS = 30.0
SEARCH_FROM_SECONDS = 15.0  # cut no earlier than this into a window
MIN_TAIL_SECONDS = 1.0  # leave no sliver shorter than this for a last window
SMOOTHING_FRAMES = 20  # 200 ms


def split_at_pauses(samples: np.ndarray, max_seconds: float = MAX_WINDOW_SECONDS) -> list[tuple[int, int]]:
    """(start, end) sample indices of consecutive windows covering `samples`, each at most
    `max_seconds` long, cut at the quietest point of each window's second half."""
    total = len(samples)
    max_len = int(max_seconds * SAMPLE_RATE) // FRAME * FRAME
    if total <= max_len:
        return [(0, total)]
    frames = total // FRAME
    energy = np.square(samples[: frames * FRAME].astype(np.float32)).reshape(frames, FRAME).mean(axis=1)
    smooth = np.convolve(energy, np.ones(SMOOTHING_FRAMES) / SMOOTHING_FRAMES, mode="same")
    windows, start = [], 0
    while total - start > max_len:
        lo = (start + int(SEARCH_FROM_SECONDS * SAMPLE_RATE)) // FRAME
        hi = min(start + max_len, total - int(MIN_TAIL_SECONDS * SAMPLE_RATE)) // FRAME
        cut = (lo + int(np.argmin(smooth[lo:hi]))) * FRAME if hi > lo else start + max_len
        windows.append((start, cut))
        start = cut
    windows.append((start, total))
    return windows
