"""The inference engine: loaded Whisper models, a request's audio cut into windows, and a batch
of windows decoded into segments.

It knows nothing of HTTP or queues (the scheduler decides what runs together). Each model gets
one worker thread: on CPU torch already spreads one batch over all cores, and batches of one
model must not overlap (word timing installs hooks on it). The event loop only awaits the
worker's future, so it stays free for other requests (health checks included).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import whisper
import whisper.timing
from torch import Tensor
from whisper.audio import HOP_LENGTH, SAMPLE_RATE
from whisper.model import Whisper
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE, Tokenizer, get_tokenizer

from optim.decoding import BatchStats, WindowInput, WindowOutput, decode_batch, split_segments
from optim.memory import release_freed_memory
from optim.registry import UnknownVariant, VariantCache, all_variants, canonical, is_distilled
from optim.student import load_student, share_with_teacher, student_path
from optim.weights import load_whisper
from optim.windows import split_at_pauses

log = logging.getLogger(__name__)

Task = Literal["transcribe", "translate"]

# openai-whisper's fallback schedule: at temperature 0 a window whose output looks like a
# loop (compression ratio) or is improbable (log-probability) is decoded again, hotter.
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
COMPRESSION_RATIO_THRESHOLD = 2.4
LOGPROB_THRESHOLD = -1.0
NO_SPEECH_THRESHOLD = 0.6  # with a low log-probability: silence, no segment


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


class VariantUnavailable(EngineError):
    code = "variant_unavailable"


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


@dataclass(frozen=True, eq=False)  # holds a tensor: identity, not value
class Window:
    """One ≤30-s piece of a request's audio, decoded independently of the others."""

    mel: Tensor  # (n_mels, frames), no padding
    offset: float  # seconds from the start of the request's audio
    language: str | None  # None: detect
    prompt: list[int]
    temperature: float
    fallback: bool  # re-decode hotter when the output looks wrong (temperature was not fixed)
    word_timestamps: bool
    full_context: bool = False

    @property
    def duration(self) -> float:
        return self.mel.shape[-1] / 100


@dataclass(frozen=True)
class WindowResult:
    offset: float  # the window's start, seconds from the request's start
    segments: list[dict]  # openai-whisper's segment dicts, times from the request's start
    language: str
    retry: Window | None = None  # decode this instead: the result is not final
    rest: Window | None = None  # the output stopped early: decode the rest of the window too


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str  # ISO code
    duration: float  # audio seconds
    segments: list[Segment]
    model: str
    variant: str
    task: Task
    queue_seconds: float = 0.0  # from arrival to the first batch that held one of its windows
    processing_seconds: float = 0.0  # from then to the last window's result
    batch_size: float = 1.0  # mean size of the batches its windows ran in
    encoder_padding: float = 0.0  # mean padding ratio of those batches
    decoder_padding: float = 0.0

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
        silence_peak: float = 1e-3,
        variants: list[str] | None = None,
        variant_budget_bytes: int = 2**30,
        variant_idle_ttl: float | None = None,
        models_dir: Path | None = None,
    ):
        self.sources = dict(sources)  # id -> bundled name or path; everything that can be served
        self.device = resolve_device(device)
        self.models_dir = models_dir  # where distilled students live (MODELS_DIR/distilled/<model>.pt)
        self._students: dict[str, Whisper] = {}
        valid = all_variants(self.device, distilled=True)
        self.variants = [canonical(v) for v in (variants or valid)]
        unavailable = [v for v in self.variants if v not in valid]
        if unavailable:
            raise ValueError(f"variants {unavailable} are not available on {self.device}; available: {valid}")
        self.variant_cache = VariantCache(variant_budget_bytes, variant_idle_ttl)
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
        self.check_student(model_id, variant)
        self.variant_cache.pinned.add((model_id, variant))
        self.variant_cache.get(model_id, self.source(model_id, variant), variant)

    # ---------------------------------------------------------------- distilled students
    def student_file(self, model_id: str) -> Path | None:
        """The student checkpoint of `model_id`, if one was built (python -m optim.distill)."""
        path = student_path(self.models_dir, model_id) if self.models_dir is not None else None
        return path if path is not None and path.is_file() else None

    def check_student(self, model_id: str, variant: str) -> None:
        if is_distilled(variant) and model_id not in self._students and self.student_file(model_id) is None:
            where = student_path(self.models_dir or Path("models"), model_id)
            raise VariantUnavailable(
                f"variant {variant!r} needs a distilled student of {model_id!r} at {where}, and there is none; "
                f"build it with `python -m optim.distill --teacher {model_id}`",
                "model",
            )

    def source(self, model_id: str, variant: str) -> Whisper:
        """What a variant is built from: the loaded model, or for `distilled` its student (loaded once)."""
        teacher = self.load(model_id).model
        if not is_distilled(variant):
            return teacher
        with self._load_lock:
            if model_id not in self._students:
                student, record = load_student(self.student_file(model_id))
                if record.get("teacher") not in (None, model_id):
                    log.warning("student of %s was distilled from %s", model_id, record.get("teacher"))
                student = student.to(self.device)
                shared = share_with_teacher(student, teacher)  # its frozen encoder and embeddings
                log.info("loaded the distilled student of %s (%.0f MB shared with it)", model_id, shared / 2**20)
                self._students[model_id] = student
            return self._students[model_id]

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
        self.check_student(model_id, variant)
        language = normalize_language(options.language)
        loaded = self._models.get(model_id)
        if loaded is None:
            return  # checked again once loaded
        if not loaded.multilingual:
            if options.task == "translate":
                raise UnsupportedOption(f"model {model_id!r} is English-only and cannot translate; use a multilingual model", "model")
            if language not in (None, "en"):
                raise UnsupportedOption(f"model {model_id!r} is English-only; it cannot transcribe language {language!r}", "language")

    def executor(self, model_id: str) -> ThreadPoolExecutor:
        return self._models[model_id].executor

    async def ensure_loaded(self, model_id: str, variant: str, options: TranscriptionOptions) -> LoadedModel:
        """The loaded model, loading a served one that was not preloaded (off the event loop)."""
        self.check(model_id, variant, options)
        loaded = self._models.get(model_id)
        if loaded is None:
            loaded = await asyncio.get_running_loop().run_in_executor(None, self.load, model_id)
            self.check(model_id, variant, options)
        return loaded

    def is_silent(self, samples: np.ndarray) -> bool:
        """Digital silence, on which Whisper tends to hallucinate ("you", "Thank you.")."""
        return samples.size == 0 or float(np.abs(samples).max()) < self.silence_peak

    def windows(self, model_id: str, samples: np.ndarray, options: TranscriptionOptions) -> list[Window]:
        """A request's audio as independent ≤30-s windows cut at pauses, with its log-mel computed
        once over the whole audio (as openai-whisper's transcribe() does). CPU work: call off-loop."""
        loaded = self._models[model_id]
        model = loaded.model
        mel = whisper.log_mel_spectrogram(torch.from_numpy(samples), model.dims.n_mels, padding=whisper.audio.N_SAMPLES)
        language = normalize_language(options.language) if loaded.multilingual else "en"
        prompt = []
        if options.prompt:
            tokenizer = self.tokenizer(model, options.task)
            prompt = tokenizer.encode(" " + options.prompt.strip())[-(model.dims.n_text_ctx // 2 - 1) :]
        return [
            Window(
                mel=mel[:, start // HOP_LENGTH : end // HOP_LENGTH].clone(),
                offset=start / SAMPLE_RATE,
                language=language,
                prompt=prompt,
                temperature=options.temperature,
                fallback=options.temperature == 0,
                word_timestamps=options.word_timestamps,
            )
            for start, end in split_at_pauses(samples)
        ]

    def tokenizer(self, model: Whisper, task: Task) -> Tokenizer:
        return get_tokenizer(model.is_multilingual, num_languages=model.num_languages, task=task)

    def run_batch(
        self, model_id: str, variant: str, task: Task, windows: list[Window], shorten_context: bool
    ) -> tuple[list[WindowResult], BatchStats]:
        """Decode windows of one model, variant and task in one batch (on the model's worker thread).
        Each result is final, or names the window to decode again: with the full 30-s context when
        a shortened one failed, then hotter (openai-whisper's temperature fallback)."""
        built = self.variant_cache.get(model_id, self.source(model_id, variant), variant)  # built on first use
        self.variant_cache.expire_idle()
        model = built.model
        tokenizer = self.tokenizer(model, task)
        inputs = [WindowInput(w.mel, w.language, w.prompt, w.temperature, w.full_context) for w in windows]
        with torch.inference_mode():
            outputs, stats = decode_batch(model, tokenizer, inputs, shorten_context, fp16=built.fp16_compute)
        shortened = stats.encoder_frames < whisper.audio.N_FRAMES
        results = []
        for window, out in zip(windows, outputs):
            silence = out.no_speech_prob > NO_SPEECH_THRESHOLD and out.avg_logprob < LOGPROB_THRESHOLD
            looping = out.compression_ratio > COMPRESSION_RATIO_THRESHOLD
            if shortened and (out.guard_tripped or looping or repeats_phrase(out.text)):
                results.append(WindowResult(window.offset, [], out.language, retry=replace(window, full_context=True)))
            elif window.fallback and not silence and (looping or out.avg_logprob < LOGPROB_THRESHOLD) and out.temperature < 1.0:
                hotter = FALLBACK_TEMPERATURES[FALLBACK_TEMPERATURES.index(round(out.temperature, 1)) + 1]
                results.append(WindowResult(window.offset, [], out.language, retry=replace(window, temperature=hotter)))
            else:
                segments, rest = ([], None) if silence else self._segments(model, tokenizer, window, out, built.fp16_compute)
                results.append(WindowResult(window.offset, segments, out.language, rest=rest))
        return results, stats

    def _segments(
        self, model: Whisper, tokenizer: Tokenizer, window: Window, out: WindowOutput, fp16: bool
    ) -> tuple[list[dict], Window | None]:
        """A decoded window's segments (times from the request's start, words when asked) and
        the rest of the window still to decode, if the output stopped early."""
        found, done = split_segments(out.tokens, tokenizer, window.duration)
        segments = [
            dict(
                seek=round(window.offset * 100),
                start=window.offset + start,
                end=window.offset + end,
                text=tokenizer.decode(tokens),
                tokens=tokens,
                temperature=out.temperature,
                avg_logprob=out.avg_logprob,
                compression_ratio=out.compression_ratio,
                no_speech_prob=out.no_speech_prob,
            )
            for start, end, tokens in found
        ]
        segments = [s for s in segments if s["end"] > s["start"] and s["text"].strip()]
        if window.word_timestamps and segments:
            mel = whisper.pad_or_trim(window.mel, whisper.audio.N_FRAMES).to(model.device)
            if fp16:
                mel = mel.half()
            whisper.timing.add_word_timestamps(
                segments=segments,
                model=model,
                tokenizer=tokenizer,
                mel=mel,
                num_frames=window.mel.shape[-1],
                last_speech_timestamp=window.offset,
            )
        consumed = round(done * 100)  # mel frames
        rest = None
        if 0 < consumed < window.mel.shape[-1]:  # (0: nothing consumed; never re-queue the same window)
            rest = replace(
                window, mel=window.mel[:, consumed:], offset=window.offset + consumed / 100, temperature=0.0 if window.fallback else window.temperature, full_context=False
            )
        return segments, rest


def repeats_phrase(text: str, times: int = 3) -> bool:
    """A phrase of 2–8 words said `times` times in a row ("in this regard, in this regard, ..."):
    the loop a shortened audio context tends to fall into, too short for the compression check."""
    words = [w.strip(".,;:!?\"'").lower() for w in text.split()]
    for n in range(2, 9):
        for i in range(len(words) - n * times + 1):
            if all(words[i + k * n : i + (k + 1) * n] == words[i : i + n] for k in range(1, times)):
                return True
    return False


def assemble(
    model_id: str, variant: str, task: Task, duration: float, results: list[WindowResult], **timing: float
) -> Transcript:
    """A request's transcript from its windows' final results, in order."""
    raw = [s for r in results for s in r.segments]
    segments = [_segment({**s, "id": i}, duration) for i, s in enumerate(raw)]
    spoken: dict[str, float] = {}  # language → seconds of speech it was detected on
    for r in results:
        spoken[r.language] = spoken.get(r.language, 0.0) + sum(s["end"] - s["start"] for s in r.segments)
    language = max(spoken, key=spoken.get) if spoken else "en"
    return Transcript(
        text="".join(s.text for s in segments).strip(),
        language=language,
        duration=duration,
        segments=segments,
        model=model_id,
        variant=variant,
        task=task,
        **timing,
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

