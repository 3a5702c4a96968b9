"""The stages of one transcription request, each a small step the router calls in order:
resolve the model → read the upload → decode the audio → run the engine. Errors of each
stage become an `APIError` with the right status here, so routers stay thin."""

from __future__ import annotations

from fastapi import UploadFile
from starlette.concurrency import run_in_threadpool

from app.audio import Audio, AudioError, AudioTooLong, UnsupportedAudio, decode_audio
from app.errors import APIError
from app.limits import UploadTooLarge
from app.settings import Settings
from optim.engine import EngineError, TranscriptionOptions, Transcript, UnknownModel, WhisperEngine

# The model name OpenAI clients send by default; served by the configured default model.
OPENAI_ALIAS = "whisper-1"


class TranscriptionService:
    def __init__(self, engine: WhisperEngine, settings: Settings, preload: list[str]):
        self.engine = engine
        self.settings = settings
        self.preload = preload

    # ---------------------------------------------------------------- models
    def model_ids(self) -> list[str]:
        return [*self.engine.sources, OPENAI_ALIAS]

    @property
    def ready(self) -> bool:
        return all(m in self.engine.loaded for m in self.preload)

    def resolve_model(self, requested: str | None) -> str:
        model_id = self.settings.default_model if requested in (None, "", OPENAI_ALIAS) else requested
        if model_id not in self.engine.sources:
            raise APIError(
                404,
                f"model {requested!r} does not exist; available: {', '.join(self.model_ids())}",
                UnknownModel.code,
                "model",
            )
        if model_id in self.preload and model_id not in self.engine.loaded:
            reason = self.engine.load_errors.get(model_id)
            message = f"model {model_id!r} failed to load: {reason}" if reason else f"model {model_id!r} is still loading"
            raise APIError(503, message, "model_not_ready", "model", headers={"Retry-After": "5"})
        return model_id

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

    async def transcribe(self, file: UploadFile, model: str | None, options: TranscriptionOptions) -> Transcript:
        model_id = self.resolve_model(model)
        try:
            self.engine.check(model_id, options)  # cheap option checks before any audio work
            audio = await self.decode(await self.read_upload(file))
            return await self.engine.transcribe(model_id, audio.samples, options)
        except EngineError as e:
            raise APIError(404 if isinstance(e, UnknownModel) else 400, str(e), e.code, e.param) from e
