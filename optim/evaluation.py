"""The evaluation sets and the one measurement on them: WER and RTFx of a model reference,
through the service's own engine and scheduler, with every clip of a set submitted at once.

Used by the training command's final evaluation (optim/distill.py) and by the benchmarks. The
sets are folders with a `manifest.jsonl` (`id`, `audio`, `text`, `lang`, `duration_s`); by
default `../shared/eval` beside the repository, or EVAL_DIR.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from optim.accuracy import corpus_wer
from optim.audio import SAMPLE_RATE, decode_audio
from optim.engine import WhisperEngine
from optim.scheduler import Scheduler, SchedulerConfig
from optim.types import ModelRef, TranscriptionOptions

EVAL_DIR = Path(os.environ.get("EVAL_DIR") or Path(__file__).resolve().parents[2] / "shared" / "eval")


@dataclass(frozen=True, eq=False)
class EvalClip:
    id: str
    text: str  # the reference transcript
    samples: np.ndarray  # 16 kHz mono float32

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE


def read_manifest(path: Path) -> list[dict]:
    """A set's manifest entries (`path`: the manifest, or the set's folder)."""
    manifest = path / "manifest.jsonl" if path.is_dir() else path
    return [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]


def load_set(name: str, eval_dir: Path = EVAL_DIR, language: str = "en") -> list[EvalClip]:
    """The clips of a set in `language` that have a reference, decoded."""
    folder = eval_dir / name
    items = [i for i in read_manifest(folder) if i.get("text") and i.get("lang", language) == language]
    return [EvalClip(i.get("id") or Path(i["audio"]).stem, i["text"], decode_audio((folder / i["audio"]).read_bytes()).samples) for i in items]


def audio_seconds(clips: list[EvalClip]) -> float:
    return sum(c.seconds for c in clips)


async def _transcribe_all(engine: WhisperEngine, ref: ModelRef, config: SchedulerConfig, clips: list[EvalClip]):
    scheduler = Scheduler(engine, config)
    options = TranscriptionOptions(language="en")
    try:
        await scheduler.transcribe(ref, clips[0].samples, options)  # builds the variant, warms up
        start = time.perf_counter()
        results = await asyncio.gather(*(scheduler.transcribe(ref, c.samples, options) for c in clips))
        return [transcript.text for transcript, _ in results], time.perf_counter() - start
    finally:
        await scheduler.close()


def transcribe_set(engine: WhisperEngine, ref: ModelRef, config: SchedulerConfig, clips: list[EvalClip]) -> tuple[list[str], float]:
    """Every clip's text and the wall seconds it took, all submitted at once after a warm-up clip
    (temperature fallback samples with a generator seeded per window: runs repeat themselves)."""
    return asyncio.run(_transcribe_all(engine, ref, config, clips))


def measure(engine: WhisperEngine, ref: ModelRef, config: SchedulerConfig, clips: list[EvalClip]) -> dict[str, float]:
    """WER % (after Whisper's English normalizer) and RTFx of one model reference on a set's clips."""
    texts, seconds = transcribe_set(engine, ref, config, clips)
    return {
        "wer": round(100 * corpus_wer([c.text for c in clips], texts), 2),
        "rtfx": round(audio_seconds(clips) / seconds, 2),
    }
