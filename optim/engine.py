"""The inference engine: loaded Whisper models and the call that turns samples into a transcript.

It knows nothing of HTTP. Each model gets one worker thread: openai-whisper's decoder installs
key/value-cache hooks on the model for the length of a call, so two calls on one model must
not overlap, and on CPU torch already spreads one call over all cores. The event loop only
awaits the worker's future, so it stays free for other requests (health checks included).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import whisper
import whisper.timing
from whisper.model import Whisper
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

from optim.memory import release_freed_memory
from optim.registry import REFERENCE, UnknownVariant, VariantCache, all_variants, canonical
from optim.weights import load_whisper

log = logging.getLogger(__name__)

Task = Literal["transcribe", "translate"]

# openai-whisper's fallback schedule: at temperature 0 a window whose output looks like a
# loop (compression ratio) or is improbable (log-probability) is decoded again, hotter.
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


class EngineError(ValueError):
    """A request the engine cannot serve as asked; `code` is a stable machine-readable name."""

    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class UnknownModel(EngineError):
    code = "model_not_found"


class UnsupportedOption(EngineError):
    code = "unsupported_option"


class VariantNotServed(EngineError):
    code = "unknown_variant"


@dataclass(frozen=True)
class TranscriptionOptions:
    task: Task = "transcribe"
    language: str | None = None  # ISO code or English name; None = detect
    prompt: str | None = None
    temperature: float = 0.0  # 0 = greedy with openai-whisper's temperature fallback
    word_timestamps: bool = False


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float
    probability: float


@dataclass(frozen=True)
class Segment:
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[Word] = field(default_factory=list)


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str  # ISO code
    duration: float  # audio seconds
    segments: list[Segment]
    model: str
    variant: str
    task: Task
    queue_seconds: float = 0.0
    processing_seconds: float = 0.0

    @property
    def words(self) -> list[Word]:
        return [w for s in self.segments for w in s.words]


@dataclass
class LoadedModel:
    id: str
    model: Whisper
    device: str
    load_seconds: float
    executor: ThreadPoolExecutor

    @property
    def multilingual(self) -> bool:
        return self.model.is_multilingual


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def normalize_language(language: str | None) -> str | None:
    """Accept an ISO code ("en") or an English name ("English"); None means detect."""
    if not language:
        return None
    key = language.strip().lower()
    if key in LANGUAGES:
        return key
    if key in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[key]
    raise UnsupportedOption(f"unknown language {language!r}: use an ISO-639-1 code such as 'en' or 'de'", "language")


class WhisperEngine:
    """Holds models by id and transcribes with them, one worker thread per model."""

    def __init__(
        self,
        sources: dict[str, str | Path],
        device: str = "auto",
        condition_on_previous_text: bool = True,
        silence_peak: float = 1e-3,
        variants: list[str] | None = None,
        variant_budget_bytes: int = 2**30,
        variant_idle_ttl: float | None = None,
    ):
        self.sources = dict(sources)  # id -> bundled name or path; everything that can be served
        self.device = resolve_device(device)
        valid = all_variants(self.device)
        self.variants = [canonical(v) for v in (variants or valid)]
        unavailable = [v for v in self.variants if v not in valid]
        if unavailable:
            raise ValueError(f"variants {unavailable} are not available on {self.device}; available: {valid}")
        self.variant_cache = VariantCache(variant_budget_bytes, variant_idle_ttl)
        self.condition_on_previous_text = condition_on_previous_text
        self.silence_peak = silence_peak
        self._models: dict[str, LoadedModel] = {}
        self._load_lock = threading.Lock()
        self.load_errors: dict[str, str] = {}

    # ---------------------------------------------------------------- loading
    @property
    def loaded(self) -> dict[str, LoadedModel]:
        return dict(self._models)

    def load(self, model_id: str) -> LoadedModel:
        """Load (once) and return a model; safe to call from several threads."""
        if model_id in self._models:
            return self._models[model_id]
        if model_id not in self.sources:
            raise self._unknown(model_id)
        with self._load_lock:
            if model_id in self._models:
                return self._models[model_id]
            start = time.perf_counter()
            try:
                model = load_whisper(self.sources[model_id]).to(self.device)
            except Exception as e:  # keep the reason for /ready
                self.load_errors[model_id] = f"{type(e).__name__}: {e}"
                raise
            _warm_up_word_timing()
            release_freed_memory()
            loaded = LoadedModel(
                id=model_id,
                model=model,
                device=self.device,
                load_seconds=time.perf_counter() - start,
                executor=ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"whisper-{model_id}"),
            )
            self._models[model_id] = loaded
            self.load_errors.pop(model_id, None)
            log.info("loaded %s on %s in %.2f s", model_id, self.device, loaded.load_seconds)
            return loaded

    def _unknown(self, model_id: str) -> UnknownModel:
        return UnknownModel(f"model {model_id!r} does not exist; available: {', '.join(self.sources)}", "model")

    def preload_variant(self, model_id: str, variant: str) -> None:
        """Build a variant now and keep it regardless of budget and TTL."""
        variant = self.check_variant(variant)
        self.variant_cache.pinned.add((model_id, variant))
        self.variant_cache.get(model_id, self.load(model_id).model, variant)

    def close(self) -> None:
        for loaded in self._models.values():
            loaded.executor.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- inference
    def check_variant(self, variant: str) -> str:
        """The canonical name of a served variant, or VariantNotServed listing the valid ones."""
        valid = f"valid variants: {', '.join(self.variants)}"
        try:
            name = canonical(variant)
        except UnknownVariant as e:
            raise VariantNotServed(f"{e}; {valid}", "model") from e
        if name not in self.variants:
            raise VariantNotServed(f"variant {variant!r} is not served; {valid}", "model")
        return name

    def check(self, model_id: str, variant: str, options: TranscriptionOptions) -> None:
        """Reject options a model cannot honour before any audio work is done."""
        self.check_variant(variant)
        if model_id not in self.sources:
            raise self._unknown(model_id)
        language = normalize_language(options.language)
        loaded = self._models.get(model_id)
        if loaded is None:
            return  # checked again once loaded
        if not loaded.multilingual:
            if options.task == "translate":
                raise UnsupportedOption(f"model {model_id!r} is English-only and cannot translate; use a multilingual model", "model")
            if language not in (None, "en"):
                raise UnsupportedOption(f"model {model_id!r} is English-only; it cannot transcribe language {language!r}", "language")

    async def transcribe(
        self, model_id: str, samples: np.ndarray, options: TranscriptionOptions, variant: str = REFERENCE
    ) -> Transcript:
        """Transcribe 16 kHz mono float32 samples with a model variant, on the model's worker thread."""
        self.check(model_id, variant, options)
        loop = asyncio.get_running_loop()
        loaded = self._models.get(model_id)
        if loaded is None:  # a served model that was not preloaded: load it off the event loop
            loaded = await loop.run_in_executor(None, self.load, model_id)
            self.check(model_id, variant, options)
        submitted = time.perf_counter()
        return await loop.run_in_executor(
            loaded.executor, self._transcribe, loaded, canonical(variant), samples, options, submitted
        )

    def _transcribe(
        self, loaded: LoadedModel, variant: str, samples: np.ndarray, options: TranscriptionOptions, submitted: float
    ) -> Transcript:
        started = time.perf_counter()
        built = self.variant_cache.get(loaded.id, loaded.model, variant)  # built on first use
        self.variant_cache.expire_idle()
        duration = len(samples) / whisper.audio.SAMPLE_RATE
        language = normalize_language(options.language)
        if not loaded.multilingual:
            language = "en"
        if samples.size == 0 or float(np.abs(samples).max()) < self.silence_peak:
            # Digital silence: Whisper tends to hallucinate ("you", "Thank you.") on it.
            result = {"text": "", "segments": [], "language": language or "en"}
        else:
            with torch.inference_mode():
                result = whisper.transcribe(
                    built.model,
                    torch.from_numpy(samples),
                    verbose=None,
                    temperature=(options.temperature,) if options.temperature > 0 else FALLBACK_TEMPERATURES,
                    condition_on_previous_text=self.condition_on_previous_text,
                    initial_prompt=options.prompt or None,
                    word_timestamps=options.word_timestamps,
                    task=options.task,
                    language=language,
                    fp16=built.fp16_compute,
                )
        finished = time.perf_counter()
        return Transcript(
            text=result["text"].strip(),
            language=result["language"],
            duration=duration,
            segments=[_segment(s, duration) for s in result["segments"]],
            model=loaded.id,
            variant=variant,
            task=options.task,
            queue_seconds=started - submitted,
            processing_seconds=finished - started,
        )


def _clamp(t: float, duration: float) -> float:
    # Whisper pads the last window to 30 s, so a final timestamp can point past the audio;
    # round down at the end so that a rounded timestamp never exceeds the duration either.
    return min(round(max(float(t), 0.0), 3), math.floor(duration * 1000) / 1000)


def _segment(s: dict, duration: float) -> Segment:
    start, end = _clamp(s["start"], duration), _clamp(s["end"], duration)
    return Segment(
        id=s["id"],
        seek=s["seek"],
        start=start,
        end=max(start, end),
        text=s["text"],
        tokens=list(s["tokens"]),
        temperature=float(s["temperature"]),
        avg_logprob=float(s["avg_logprob"]),
        compression_ratio=float(s["compression_ratio"]),
        no_speech_prob=float(s["no_speech_prob"]),
        words=[
            Word(w["word"], _clamp(w["start"], duration), max(_clamp(w["start"], duration), _clamp(w["end"], duration)), float(w["probability"]))
            for w in s.get("words", [])
        ],
    )


_word_timing_ready = False


def _warm_up_word_timing() -> None:
    """Compile openai-whisper's numba DTW once at load time, not inside the first request."""
    global _word_timing_ready
    if not _word_timing_ready:
        whisper.timing.dtw(torch.rand(8, 12))
        _word_timing_ready = True

