"""POST /v1/audio/transcriptions and /v1/audio/translations (OpenAI's Audio API)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from app import formats
from app.dependencies import get_service
from app.errors import APIError
from app.formats import ResponseFormat
from app.service import TranscriptionService
from optim.engine import Task, Transcript, TranscriptionOptions

router = APIRouter(prefix="/v1/audio", tags=["audio"])

Granularity = Literal["segment", "word"]


def render(t: Transcript, response_format: ResponseFormat, granularities: list[Granularity]) -> Response:
    if response_format is ResponseFormat.json:
        return JSONResponse(formats.as_json(t))
    if response_format is ResponseFormat.verbose_json:
        return JSONResponse(formats.as_verbose_json(t, words="word" in granularities))
    text = {ResponseFormat.text: formats.as_text, ResponseFormat.srt: formats.as_srt, ResponseFormat.vtt: formats.as_vtt}
    media = "text/vtt" if response_format is ResponseFormat.vtt else "text/plain"
    return PlainTextResponse(text[response_format](t), media_type=media)


async def _run(
    service: TranscriptionService,
    task: Task,
    file: UploadFile,
    model: str | None,
    language: str | None,
    prompt: str | None,
    response_format: ResponseFormat,
    temperature: float,
    granularities: list[Granularity],
    variant: str | None = None,
) -> Response:
    if "word" in granularities and response_format is not ResponseFormat.verbose_json:
        raise APIError(
            400, "timestamp_granularities requires response_format=verbose_json", "invalid_value", "timestamp_granularities"
        )
    options = TranscriptionOptions(
        task=task, language=language, prompt=prompt, temperature=temperature, word_timestamps="word" in granularities
    )
    transcript = await service.transcribe(file, model, options, variant)
    response = render(transcript, response_format, granularities)
    response.headers["X-Model"] = f"{transcript.model}:{transcript.variant}"
    response.headers["X-Queue-Seconds"] = f"{transcript.queue_seconds:.3f}"
    response.headers["X-Processing-Seconds"] = f"{transcript.processing_seconds:.3f}"
    response.headers["X-Batch-Size"] = f"{transcript.batch_size:.2f}"
    return response


ModelField = Annotated[
    str | None, Form(description="A served model id, optionally `model:variant` (see GET /v1/models), or `whisper-1`.")
]
VariantField = Annotated[str | None, Form(description="A model variant (`fp32`, `int8+flash`, ...); same as `model:variant`.")]
PromptField = Annotated[str | None, Form(description="Text to steer style or vocabulary; conditions every window.")]
FormatField = Annotated[ResponseFormat, Form()]
TemperatureField = Annotated[float, Form(ge=0.0, le=1.0, description="0 = greedy with automatic fallback.")]


@router.post("/transcriptions")
async def create_transcription(
    file: Annotated[UploadFile, File(description="Audio: wav, flac, mp3, ogg/opus, webm, m4a, ...")],
    service: Annotated[TranscriptionService, Depends(get_service)],
    model: ModelField = None,
    language: Annotated[str | None, Form(description="ISO-639-1 code; detected when absent.")] = None,
    prompt: PromptField = None,
    response_format: FormatField = ResponseFormat.json,
    temperature: TemperatureField = 0.0,
    timestamp_granularities: Annotated[list[Granularity], Form(alias="timestamp_granularities[]")] = ["segment"],
    variant: VariantField = None,
) -> Response:
    return await _run(
        service, "transcribe", file, model, language, prompt, response_format, temperature, timestamp_granularities, variant
    )


@router.post("/translations")
async def create_translation(
    file: Annotated[UploadFile, File(description="Audio in any language Whisper knows.")],
    service: Annotated[TranscriptionService, Depends(get_service)],
    model: ModelField = None,
    prompt: PromptField = None,
    response_format: FormatField = ResponseFormat.json,
    temperature: TemperatureField = 0.0,
    variant: VariantField = None,
) -> Response:
    return await _run(service, "translate", file, model, None, prompt, response_format, temperature, ["segment"], variant)
