"""POST /v1/audio/transcriptions and /v1/audio/translations (OpenAI's Audio API)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from app import formats
from app.dependencies import get_service
from app.errors import APIError
from app.formats import ResponseFormat
from app.service import Outcome, TranscriptionService
from optim.engine import Task, TranscriptionOptions

router = APIRouter(prefix="/v1/audio", tags=["audio"])

Granularity = Literal["segment", "word"]


def render(o: Outcome, response_format: ResponseFormat, granularities: list[Granularity]) -> Response:
    t, figures = o.transcript, formats.performance(o)
    headers = formats.performance_headers(figures)
    if response_format is ResponseFormat.json:
        return JSONResponse(formats.as_json(t), headers=headers)
    if response_format is ResponseFormat.verbose_json:
        body = formats.as_verbose_json(t, words="word" in granularities, metrics=figures)
        return JSONResponse(body, headers=headers)
    text = {ResponseFormat.text: formats.as_text, ResponseFormat.srt: formats.as_srt, ResponseFormat.vtt: formats.as_vtt}
    media = "text/vtt" if response_format is ResponseFormat.vtt else "text/plain"
    return PlainTextResponse(text[response_format](t), media_type=media, headers=headers)


async def _run(
    request: Request,
    service: TranscriptionService,
    task: Task,
    file: UploadFile,
    model: str | None,
    language: str | None,
    prompt: str | None,
    response_format: ResponseFormat,
    temperature: float,
    granularities: list[Granularity],
    variant: str | None,
    reference: str | None,
) -> Response:
    if "word" in granularities and response_format is not ResponseFormat.verbose_json:
        raise APIError(
            400, "timestamp_granularities requires response_format=verbose_json", "invalid_value", "timestamp_granularities"
        )
    options = TranscriptionOptions(
        task=task, language=language, prompt=prompt, temperature=temperature, word_timestamps="word" in granularities
    )
    model_id, variant = service.resolve_model(model, variant)
    request.state.model_labels = (model_id, variant)  # for the request metrics (app.metrics.RequestCounter)
    outcome = await service.transcribe(file, model_id, variant, options, reference)
    return render(outcome, response_format, granularities)


ModelField = Annotated[
    str | None, Form(description="A served model id, optionally `model:variant` (see GET /v1/models), or `whisper-1`.")
]
VariantField = Annotated[str | None, Form(description="A model variant (`fp32`, `int8+flash`, ...); same as `model:variant`.")]
PromptField = Annotated[str | None, Form(description="Text to steer style or vocabulary; conditions every window.")]
FormatField = Annotated[ResponseFormat, Form()]
TemperatureField = Annotated[float, Form(ge=0.0, le=1.0, description="0 = greedy with automatic fallback.")]
ReferenceField = Annotated[
    str | None,
    Form(description="The expected transcript: the response then reports `wer` and `cer` (after Whisper's normalizers)."),
]


@router.post("/transcriptions")
async def create_transcription(
    request: Request,
    file: Annotated[UploadFile, File(description="Audio: wav, flac, mp3, ogg/opus, webm, m4a, ...")],
    service: Annotated[TranscriptionService, Depends(get_service)],
    model: ModelField = None,
    language: Annotated[str | None, Form(description="ISO-639-1 code; detected when absent.")] = None,
    prompt: PromptField = None,
    response_format: FormatField = ResponseFormat.json,
    temperature: TemperatureField = 0.0,
    timestamp_granularities: Annotated[list[Granularity], Form(alias="timestamp_granularities[]")] = ["segment"],
    variant: VariantField = None,
    reference: ReferenceField = None,
) -> Response:
    return await _run(
        request, service, "transcribe", file, model, language, prompt, response_format, temperature,
        timestamp_granularities, variant, reference,
    )


@router.post("/translations")
async def create_translation(
    request: Request,
    file: Annotated[UploadFile, File(description="Audio in any language Whisper knows.")],
    service: Annotated[TranscriptionService, Depends(get_service)],
    model: ModelField = None,
    prompt: PromptField = None,
    response_format: FormatField = ResponseFormat.json,
    temperature: TemperatureField = 0.0,
    variant: VariantField = None,
    reference: ReferenceField = None,
) -> Response:
    return await _run(
        request, service, "translate", file, model, None, prompt, response_format, temperature, ["segment"], variant, reference
    )
