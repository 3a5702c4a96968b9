"""The stages of one transcription request, each a small step the router calls in order:
resolve the model → read the upload → decode the audio → schedule (batch, run, reassemble) →
score against the reference, if one came. Failures are `ServiceError`s with a kind, which
app/errors.py turns into statuses; each finished request is reported to the metrics."""

from __future__ import annotations

import time
from typing import Callable

from fastapi import UploadFile
from starlette.concurrency import run_in_threadpool

from app.limits import UploadTooLarge
from app.metrics import Metrics
from app.settings import Settings
from app.shutdown import Shutdown
from optim.accuracy import has_words, score
from optim.audio import Audio, decode_audio
from optim.budget import AudioBudget, Share
from optim.engine import WhisperEngine
from optim.errors import InvalidRequest, PromptTooLong, ServiceError
from optim.memory import trim_heap
from optim.scheduler import Scheduler
from optim.types import ModelRef, Outcome, TranscriptionOptions

# The model name OpenAI clients send by default; served by the configured default model.
OPENAI_ALIAS = "whisper-1"


class TranscriptionService:
    def __init__(
        self, engine: WhisperEngine, scheduler: Scheduler, metrics: Metrics, settings: Settings, shutdown: Shutdown, budget: AudioBudget
    ):
        self.engine = engine
        self.shutdown = shutdown
        self.audio_budget = budget
        self.models = engine.models
        self.scheduler = scheduler
        self.metrics = metrics
        self.settings = settings
        if settings.default_model not in self.models.sources:
            raise ValueError(f"DEFAULT_MODEL {settings.default_model!r} is not served; served: {', '.join(self.models.sources)}")

    # ---------------------------------------------------------------- models
    def model_ids(self) -> list[str]:
        """Every name a request may use: `model`, `model:variant` for each served variant, the alias."""
        ids = []
        for model_id in self.models.sources:
            ids += [model_id, *(f"{model_id}:{v}" for v in self.models.variants)]
        return [*ids, OPENAI_ALIAS]

    def unavailable(self, name: str) -> str | None:
        """Why a listed `model:variant` cannot serve yet (a distilled student not built), or None."""
        model_id, _, variant = name.partition(":")
        if not variant or model_id not in self.models.sources:
            return None
        try:
            self.models.check_student(self.models.ref(model_id, self.models.variant(variant), check_ready=False))
        except ServiceError as e:
            return str(e)
        return None

    def resolve_model(self, requested: str | None, variant: str | None = None) -> ModelRef:
        """The reference a request's `model` (and optional `variant`) field stands for: parsed here,
        once; `whisper-1` or no model is the default model."""
        name = self.settings.default_model if requested in (None, "", OPENAI_ALIAS) else requested
        model_id, _, named = name.partition(":")
        if model_id not in self.models.sources:
            raise self.models.unknown(requested)
        chosen = self.models.variant(variant or named) if variant or named else None
        if variant and named and self.models.variant(named) != chosen:
            raise InvalidRequest(f"model {requested!r} and variant {variant!r} disagree", "variant")
        return self.models.ref(model_id, chosen)

    # ---------------------------------------------------------------- stages
    async def read_upload(self, file: UploadFile) -> bytes:
        data = await file.read()
        if len(data) > self.settings.max_upload_bytes:
            raise UploadTooLarge(self.settings.max_upload_bytes)
        return data

    async def decode(self, data: bytes, share: Share) -> Audio:
        start = time.perf_counter()
        try:
            return await run_in_threadpool(decode_audio, data, self.settings.max_audio_seconds, share.grow)
        except ServiceError:  # a refused upload may have decoded a lot first (a bomb): its buffer goes back to the OS
            await run_in_threadpool(trim_heap)
            raise
        finally:  # timed whether or not the upload was audio
            self.metrics.decode_seconds.observe(time.perf_counter() - start)

    async def transcribe(
        self,
        file: UploadFile,
        ref: ModelRef,
        options: TranscriptionOptions,
        reference: str | None = None,
        on_text: Callable[[str], None] | None = None,
        on_queued: Callable[[], None] | None = None,
    ) -> Outcome:
        """Transcribe for a reference from `resolve_model`. `on_text` and `on_queued`: a streamed
        request's (app/streaming.py), passed to `Scheduler.transcribe`."""
        self.shutdown.check()
        if reference is not None and not has_words(reference):
            raise InvalidRequest("reference has no words; leave the field out to transcribe without scoring", "reference")
        if options.prompt is not None and len(options.prompt) > self.settings.max_prompt_chars:
            raise PromptTooLong(len(options.prompt), self.settings.max_prompt_chars)
        start = time.perf_counter()
        in_flight = self.metrics.in_flight.labels(ref.model, str(ref.variant))
        in_flight.inc()
        try:
            self.engine.check(ref, options)  # cheap option checks before any audio work
            data = await self.read_upload(file)
            with self.audio_budget.share() as share:  # the decoded audio's memory, until the transcript is assembled
                decode_start = time.perf_counter()
                audio = await self.decode(data, share)
                decode_seconds = time.perf_counter() - decode_start
                del data
                transcript, timing = await self.scheduler.transcribe(ref, audio.samples, options, on_text, on_queued)
                del audio
        finally:
            in_flight.dec()
        # A translation's text is English whatever the audio's language.
        text_language = "en" if options.task == "translate" else transcript.language
        scored = await run_in_threadpool(score, reference, transcript.text, text_language) if reference is not None else None
        outcome = Outcome(transcript, timing, decode_seconds, time.perf_counter() - start, scored)
        self.metrics.observe(outcome)
        return outcome
