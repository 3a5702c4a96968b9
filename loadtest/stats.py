"""The arithmetic of a run: latency percentiles, throughput, WER and transcript agreement.

Pure functions on plain numbers and strings, so they can be checked on hand-made values.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def latency_percentiles(latencies: list[float]) -> dict[str, float | None]:
    """p50 / p95 / p99 in seconds (numpy's linear interpolation); None when there is nothing to measure."""
    if not latencies:
        return {"p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(np.asarray(latencies, dtype=float), [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}


def audio_throughput(successful_durations: list[float], wall_seconds: float) -> float:
    """Audio seconds transcribed per second of wall time (the RTFx of the whole server under load)."""
    return sum(successful_durations) / wall_seconds if wall_seconds > 0 else 0.0


def request_rate(successful: int, wall_seconds: float) -> float:
    return successful / wall_seconds if wall_seconds > 0 else 0.0


@lru_cache(maxsize=1)
def _english_normalizer():
    # Imported on first use: `whisper` pulls in torch, which the rest of the tool does not need.
    from whisper.normalizers import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize(text: str) -> str:
    return _english_normalizer()(text)


def word_error_rate(references: list[str], hypotheses: list[str]) -> float | None:
    """Corpus WER after Whisper's English normalizer on both sides, as the Whisper paper computes it.

    Word errors are summed over all pairs and divided by all reference words, so long clips weigh
    more than short ones. None when there are no reference words at all.
    """
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError("references and hypotheses differ in length")
    refs = [normalize(r) for r in references]
    hyps = [normalize(h) for h in hypotheses]
    reference_words = sum(len(r.split()) for r in refs)
    if reference_words == 0:
        return None
    # jiwer measures each pair; empty strings are fine for it (an empty reference counts insertions).
    measured = jiwer.process_words(refs, hyps)
    return (measured.substitutions + measured.deletions + measured.insertions) / reference_words


def transcript_agreement(baseline: dict[str, str], other: dict[str, str]) -> float | None:
    """WER of `other`'s transcripts measured against `baseline`'s, over the items both answered.

    0.0 means the same words for every item: how "accuracy unchanged" is shown on audio
    that has no reference transcript.
    """
    shared = sorted(baseline.keys() & other.keys())
    if not shared:
        return None
    return word_error_rate([baseline[i] for i in shared], [other[i] for i in shared])
