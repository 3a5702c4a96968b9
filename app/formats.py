"""Render a finished request in the response formats of OpenAI's Audio API, and its performance
figures as verbose_json's `metrics` object and as `X-...` headers (for every format).

Adding a format: a `ResponseFormat` member and its entry in `RENDERERS` (at the end)."""

from __future__ import annotations

from enum import Enum
from typing import Any, Callable

from fastapi.responses import JSONResponse, PlainTextResponse, Response
from whisper.tokenizer import LANGUAGES
from whisper.utils import format_timestamp

from optim.types import Outcome, Segment, Transcript


class ResponseFormat(str, Enum):
    json = "json"
    text = "text"
    srt = "srt"
    vtt = "vtt"
    verbose_json = "verbose_json"


def usage(t: Transcript) -> dict[str, Any]:
    return {"type": "duration", "seconds": round(t.duration, 3)}


def as_json(t: Transcript) -> dict[str, Any]:
    return {"text": t.text, "usage": usage(t)}


def performance(o: Outcome) -> dict[str, Any]:
    """How the request went: where its time went, the batches it shared, and its accuracy when it
    came with a reference. RTFx is audio seconds per compute second (None for silence, which needs
    no model)."""
    t, timing = o.transcript, o.timing
    body: dict[str, Any] = {
        "model": t.model,
        "variant": t.variant,
        "audio_seconds": round(t.duration, 3),
        "decode_seconds": round(o.decode_seconds, 4),
        "queue_seconds": round(timing.queue_seconds, 4),
        "compute_seconds": round(timing.compute_seconds, 4),
        "total_seconds": round(o.total_seconds, 4),
        "rtfx": None if o.rtfx is None else round(o.rtfx, 2),
        "batch_size": round(timing.batch_size, 2),
        "padding_ratio": {"encoder": round(timing.encoder_padding, 4), "decoder": round(timing.decoder_padding, 4)},
    }
    if o.score is not None:
        body |= {"wer": round(o.score.wer, 4), "cer": round(o.score.cer, 4)}
    return body


def performance_headers(p: dict[str, Any]) -> dict[str, str]:
    """`performance()`'s figures as response headers."""
    headers = {
        "X-Model": f"{p['model']}:{p['variant']}",
        "X-Audio-Seconds": str(p["audio_seconds"]),
        "X-Decode-Seconds": str(p["decode_seconds"]),
        "X-Queue-Seconds": str(p["queue_seconds"]),
        "X-Compute-Seconds": str(p["compute_seconds"]),
        "X-Total-Seconds": str(p["total_seconds"]),
        "X-Batch-Size": str(p["batch_size"]),
        "X-Padding-Ratio-Encoder": str(p["padding_ratio"]["encoder"]),
        "X-Padding-Ratio-Decoder": str(p["padding_ratio"]["decoder"]),
    }
    optional = {"X-RTFx": p["rtfx"], "X-WER": p.get("wer"), "X-CER": p.get("cer")}
    return headers | {name: str(value) for name, value in optional.items() if value is not None}


def as_verbose_json(t: Transcript, words: bool, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": t.task,
        # OpenAI reports the language by name ("english"), and for a translation the output's.
        "language": "english" if t.task == "translate" else LANGUAGES.get(t.language, t.language),
        "duration": round(t.duration, 3),
        "text": t.text,
        "segments": [_segment(s) for s in t.segments],
        "usage": usage(t),
    }
    if words:
        body["words"] = [{"word": w.word.strip(), "start": w.start, "end": w.end} for w in t.words]
    if metrics is not None:
        body["metrics"] = metrics
    return body


def _segment(s: Segment) -> dict[str, Any]:
    return {
        "id": s.id,
        "seek": s.seek,
        "start": s.start,
        "end": s.end,
        "text": s.text,
        "tokens": s.tokens,
        "temperature": s.temperature,
        "avg_logprob": s.avg_logprob,
        "compression_ratio": s.compression_ratio,
        "no_speech_prob": s.no_speech_prob,
    }


def as_srt(t: Transcript) -> str:
    cues = [
        f"{i}\n{format_timestamp(s.start, True, ',')} --> {format_timestamp(s.end, True, ',')}\n{s.text.strip()}\n"
        for i, s in enumerate(t.segments, start=1)
    ]
    return "\n".join(cues)


def as_vtt(t: Transcript) -> str:
    cues = [f"{format_timestamp(s.start)} --> {format_timestamp(s.end)}\n{s.text.strip()}\n" for s in t.segments]
    return "\n".join(["WEBVTT\n", *cues])


def as_text(t: Transcript) -> str:
    return t.text + "\n" if t.text else ""


# format → (media type, body from the outcome and whether word timestamps were asked)
RENDERERS: dict[ResponseFormat, tuple[str, Callable[[Outcome, bool], Any]]] = {
    ResponseFormat.json: ("application/json", lambda o, words: as_json(o.transcript)),
    ResponseFormat.verbose_json: ("application/json", lambda o, words: as_verbose_json(o.transcript, words, performance(o))),
    ResponseFormat.text: ("text/plain", lambda o, words: as_text(o.transcript)),
    ResponseFormat.srt: ("text/plain", lambda o, words: as_srt(o.transcript)),
    ResponseFormat.vtt: ("text/vtt", lambda o, words: as_vtt(o.transcript)),
}


def render(o: Outcome, response_format: ResponseFormat, words: bool) -> Response:
    """The response for a finished request: its body in `response_format`, its figures as headers."""
    media_type, body = RENDERERS[response_format]
    headers = performance_headers(performance(o))
    if media_type == "application/json":
        return JSONResponse(body(o, words), headers=headers)
    return PlainTextResponse(body(o, words), media_type=media_type, headers=headers)
