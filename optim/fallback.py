"""What to do with a decoded window that looks wrong: openai-whisper's fallback policy, plus the
guards of the shortened audio context. Pure decisions on one window's output; the engine acts
on them, and distillation uses the same thresholds to drop labels the service would not trust."""

from __future__ import annotations

from dataclasses import replace

from optim.decoding import WindowOutput
from optim.types import Window

# openai-whisper's schedule: at temperature 0 a window whose output looks like a loop
# (compression ratio) or is improbable (log-probability) is decoded again, hotter.
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
COMPRESSION_RATIO_THRESHOLD = 2.4
LOGPROB_THRESHOLD = -1.0
NO_SPEECH_THRESHOLD = 0.6  # with a low log-probability: silence, no segment


def is_silence(out: WindowOutput) -> bool:
    return out.no_speech_prob > NO_SPEECH_THRESHOLD and out.avg_logprob < LOGPROB_THRESHOLD


def is_trusted(out: WindowOutput) -> bool:
    """Confident and not looping: an output no fallback would re-decode."""
    return out.avg_logprob >= LOGPROB_THRESHOLD and out.compression_ratio <= COMPRESSION_RATIO_THRESHOLD and bool(out.text.strip())


def retry(window: Window, out: WindowOutput, shortened: bool) -> Window | None:
    """The window to decode instead of accepting `out`, or None when `out` is final: with the
    full 30-s context when a shortened one failed its guards, else hotter (temperature fallback)."""
    looping = out.compression_ratio > COMPRESSION_RATIO_THRESHOLD
    if shortened and (out.guard_tripped or looping or repeats_phrase(out.text)):
        return replace(window, full_context=True)
    improbable = looping or out.avg_logprob < LOGPROB_THRESHOLD
    if window.fallback and not is_silence(out) and improbable and out.temperature < 1.0:
        hotter = FALLBACK_TEMPERATURES[FALLBACK_TEMPERATURES.index(round(out.temperature, 1)) + 1]
        return replace(window, temperature=hotter)
    return None


def repeats_phrase(text: str, times: int = 3) -> bool:
    """A phrase of 2–8 words said `times` times in a row ("in this regard, in this regard, ..."):
    the loop a shortened audio context tends to fall into, too short for the compression check."""
    words = [w.strip(".,;:!?\"'").lower() for w in text.split()]
    for n in range(2, 9):
        for i in range(len(words) - n * times + 1):
            if all(words[i + k * n : i + (k + 1) * n] == words[i : i + n] for k in range(1, times)):
                return True
    return False
