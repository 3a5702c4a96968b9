"""The stages of one transcription request, each a small step the router calls in order:
resolve the model → read the upload → decode the audio → schedule (batch, run, reassemble) → score
against the reference, if one came. Errors of each stage become an `APIError` with the right status
here, so routers stay thin; each finished request is reported to the metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import UploadFile
from starlette.concurrency import run_in_threadpool

from app.audio import Audio, AudioError, AudioTooLong, UnsupportedAudio, decode_audio
from app.errors import APIError
from app.limits import UploadTooLarge
from app.metrics import Metrics
from app.scheduler import QueueFull, Scheduler
from app.settings import Settings
from optim.accuracy import Score, has_words, score
from optim.engine import EngineError, Transcript, TranscriptionOptions, UnknownModel, WhisperEngine
from optim.registry import recommended

# The model name OpenAI clients send by default; served by the configured default model.
OPENAI_ALIAS = "whisper-1"


@dataclass(frozen=True)
class Outcome:
    """A finished request: its transcript and how it went."""

    transcript: Transcript
    decode_seconds: float  # upload → 16 kHz samples
    total_seconds: float  # from the parsed request to the scored transcript
    score: Score | None  # against the request's reference, if it had one

    @property
    def rtfx(self) -> float | None:
        """Audio seconds per compute second; None for audio answered without the model (silence)."""
        t = self.transcript
        return t.duration / t.processing_seconds if t.processing_seconds > 0 else None


class TranscriptionService:
    def __init__(
        self, engine: WhisperEngine, scheduler: Scheduler, metrics: Metrics, settings: Settings, preload: list[str]
    ):
        self.engine = engine
        self.scheduler = scheduler
        self.metrics = metrics
        self.settings = settings
        self.preload = preload
        if settings.default_model not in engine.sources:
            raise ValueError(f"DEFAULT_MODEL {settings.default_model!r} is not served; served: {', '.join(engine.sources)}")
        default = recommended(engine.device) if settings.default_variant == "auto" else settings.default_variant
        self.default_variant = engine.check_variant(default)
        self.preload_variants: list[tuple[str, str]] = []  # (model id, canonical variant)
        for model_id, variant in map(self._split, settings.preload_variants):
            if model_id not in engine.sources:
                raise ValueError(f"PRELOAD_VARIANTS names model {model_id!r}, which is not served")
            self.preload_variants.append((model_id, engine.check_variant(variant)))

    # ---------------------------------------------------------------- models
    def model_ids(self) -> list[str]:
        """Every name a request may use: `model`, `model:variant` for each served variant, the alias."""
        ids = []
        for model_id in self.engine.sources:
            ids += [model_id, *(f"{model_id}:{v}" for v in self.engine.variants)]
        return [*ids, OPENAI_ALIAS]

    def unavailable(self, name: str) -> str | None:
        """Why a listed `model:variant` cannot serve yet (a distilled student not built), or None."""
        model_id, _, variant = name.partition(":")
        if not variant or model_id not in self.engine.sources:
            return None
        try:
            self.engine.check_student(model_id, variant)
        except EngineError as e:
            return str(e)
        return None

    @property
    def ready(self) -> bool:
        built = {(b.model_id, b.variant) for b in self.engine.variant_cache.built()}
        return set(self.preload_variants) <= built and all(m in self.engine.loaded for m in self.preload)

    def _split(self, name: str) -> tuple[str, str]:
        model_id, _, variant = name.partition(":")
        return model_id, variant or self.default_variant

    def resolve_model(self, requested: str | None, variant: str | None = None) -> tuple[str, str]:
        """(model id, canonical variant) for a request's `model` (and optional `variant`) field."""
        model_id, named_variant = self._split(self.settings.default_model if requested in (None, "", OPENAI_ALIAS) else requested)
        if model_id not in self.engine.sources:
            raise APIError(
                404,
                f"model {requested!r} does not exist; available: {', '.join(self.engine.sources)} "
                f"(optionally as model:variant), or {OPENAI_ALIAS}",
                UnknownModel.code,
                "model",
            )
        explicit = requested is not None and ":" in requested
        if variant and explicit and self._canonical(variant) != self._canonical(named_variant):
            raise APIError(400, f"model {requested!r} and variant {variant!r} disagree", "invalid_value", "variant")
        chosen = self._canonical(variant or named_variant)
        if model_id in self.preload and model_id not in self.engine.loaded:
            reason = self.engine.load_errors.get(model_id)
            message = f"model {model_id!r} failed to load: {reason}" if reason else f"model {model_id!r} is still loading"
            raise APIError(503, message, "model_not_ready", "model", headers={"Retry-After": "5"})
        return model_id, chosen

    def _canonical(self, variant: str) -> str:
        try:
            return self.engine.check_variant(variant)
        except EngineError as e:
            raise APIError(400, str(e), e.code, "model") from e

    # ---------------------------------------------------------------- stages
    async def read_upload(self, file: UploadFile) -> bytes:
        data = await file.read()
        if len(data) > self.settings.max_upload_bytes:
            raise UploadTooLarge(self.settings.max_upload_bytes)
        return data

    async def decode(self, data: bytes) -> Audio:
        try:
            return await run_in_threadpool(decode_audio, data, self.settings.max_audio_seconds)
        except AudioError as e:
            status = 415 if isinstance(e, UnsupportedAudio) else 413 if isinstance(e, AudioTooLong) else 400
            raise APIError(status, str(e), e.code, "file") from e

    async def transcribe(
        self, file: UploadFile, model_id: str, variant: str, options: TranscriptionOptions, reference: str | None = None
    ) -> Outcome:
        """Transcribe for a model and variant from `resolve_model`."""
        if reference is not None and not has_words(reference):
            raise APIError(400, "reference has no words; leave the field out to transcribe without scoring",
                           "invalid_value", "reference")
        start = time.perf_counter()
        in_flight = self.metrics.in_flight.labels(model_id, variant)
        in_flight.inc()
        try:
            self.engine.check(model_id, variant, options)  # cheap option checks before any audio work
            data = await self.read_upload(file)
            decode_start = time.perf_counter()
            try:
                audio = await self.decode(data)
            finally:  # timed whether or not the upload was audio
                decode_seconds = time.perf_counter() - decode_start
                self.metrics.decode_seconds.observe(decode_seconds)
            transcript = await self.scheduler.transcribe(model_id, variant, audio.samples, options)
        except QueueFull as e:
            raise APIError(503, str(e), "server_overloaded", None, headers={"Retry-After": str(e.retry_after)}) from e
        except EngineError as e:
            raise APIError(404 if isinstance(e, UnknownModel) else 400, str(e), e.code, e.param) from e
        finally:
            in_flight.dec()
        # A translation's text is English whatever the audio's language.
        text_language = "en" if options.task == "translate" else transcript.language
        scored = await run_in_threadpool(score, reference, transcript.text, text_language) if reference is not None else None
        outcome = Outcome(transcript, decode_seconds, time.perf_counter() - start, scored)
        self.metrics.observe_transcript(outcome)
        return outcome
