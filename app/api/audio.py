"""POST /v1/audio/transcriptions and /v1/audio/translations (OpenAI's Audio API).

Routes tagged `COUNTED` are counted by the request-counter middleware under their `name`
(the `endpoint` label), whatever their outcome. `stream=true` on transcriptions answers
server-sent events (app/streaming.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import Response

from app.dependencies import get_service
from app.disconnect import unless_disconnected
from app.formats import ResponseFormat, render
from app.service import TranscriptionService
from app.streaming import open_stream
from optim.errors import InvalidRequest
from optim.types import Task, TranscriptionOptions

COUNTED = "audio"  # the tag of routes the request counter counts
router = APIRouter(prefix="/v1/audio", tags=[COUNTED])

Granularity = Literal["segment", "word"]
STREAMED_FORMATS = (ResponseFormat.json, ResponseFormat.text)  # a stream carries text only: no segments or cues


@dataclass(frozen=True)
class AudioRequest:
    """The form fields of either endpoint, once FastAPI has validated them."""

    task: Task
    file: UploadFile
    model: str | None
    variant: str | None
    language: str | None
    prompt: str | None
    response_format: ResponseFormat
    temperature: float
    granularities: list[Granularity]
    reference: str | None
    stream: bool = False

    @property
    def words(self) -> bool:
        return "word" in self.granularities

    def options(self) -> TranscriptionOptions:
        if self.words and self.response_format is not ResponseFormat.verbose_json:
            raise InvalidRequest("timestamp_granularities requires response_format=verbose_json", "timestamp_granularities")
        if self.stream and self.task == "translate":
            raise InvalidRequest("translations are not streamed (OpenAI's have no stream); leave out stream or set it false", "stream")
        if self.stream and self.response_format not in STREAMED_FORMATS:
            raise InvalidRequest(
                f"stream=true streams the text only: use response_format json or text, not {self.response_format.value}", "stream"
            )
        return TranscriptionOptions(
            task=self.task, language=self.language, prompt=self.prompt, temperature=self.temperature, word_timestamps=self.words
        )


async def _run(request: Request, service: TranscriptionService, form: AudioRequest) -> Response:
    options = form.options()
    ref = service.resolve_model(form.model, form.variant)
    request.state.model_labels = (ref.model, str(ref.variant))  # for the request metrics (app.metrics.RequestCounter)
    if form.stream:  # admitted and queued before the response starts: refusals keep their status
        stream = await unless_disconnected(request, open_stream(service, form.file, ref, options, form.reference))
        return stream.response(request)
    outcome = await unless_disconnected(request, service.transcribe(form.file, ref, options, form.reference))
    return render(outcome, form.response_format, form.words)


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
StreamField = Annotated[
    bool,
    Form(
        description="Answer server-sent events (`text/event-stream`): `transcript.text.delta` as the text becomes final, "
        "window by window in audio order, then `transcript.text.done`. With response_format json or text only."
    ),
]
Service = Annotated[TranscriptionService, Depends(get_service)]


@router.post("/transcriptions", name="transcriptions")
async def create_transcription(
    request: Request,
    file: Annotated[UploadFile, File(description="Audio: wav, flac, mp3, ogg/opus, webm, m4a, ...")],
    service: Service,
    model: ModelField = None,
    language: Annotated[str | None, Form(description="ISO-639-1 code; detected when absent.")] = None,
    prompt: PromptField = None,
    response_format: FormatField = ResponseFormat.json,
    temperature: TemperatureField = 0.0,
    timestamp_granularities: Annotated[list[Granularity], Form(alias="timestamp_granularities[]")] = ["segment"],
    variant: VariantField = None,
    reference: ReferenceField = None,
    stream: StreamField = False,
) -> Response:
    form = AudioRequest(
        task="transcribe", file=file, model=model, variant=variant, language=language, prompt=prompt,
        response_format=response_format, temperature=temperature, granularities=timestamp_granularities, reference=reference,
        stream=stream,
    )
    return await _run(request, service, form)


@router.post("/translations", name="translations")
async def create_translation(
    request: Request,
    file: Annotated[UploadFile, File(description="Audio in any language Whisper knows.")],
    service: Service,
    model: ModelField = None,
    prompt: PromptField = None,
    response_format: FormatField = ResponseFormat.json,
    temperature: TemperatureField = 0.0,
    variant: VariantField = None,
    reference: ReferenceField = None,
    stream: Annotated[bool, Form(description="Not supported (OpenAI's translations have no stream): `true` is refused (400).")] = False,
) -> Response:
    form = AudioRequest(
        task="translate", file=file, model=model, variant=variant, language=None, prompt=prompt,
        response_format=response_format, temperature=temperature, granularities=["segment"], reference=reference,
        stream=stream,
    )
    return await _run(request, service, form)
