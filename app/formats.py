"""Render a `Transcript` in the response formats of OpenAI's Audio API."""

from __future__ import annotations

from enum import Enum
from typing import Any

from whisper.tokenizer import LANGUAGES
from whisper.utils import format_timestamp

from optim.engine import Segment, Transcript


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


def as_verbose_json(t: Transcript, words: bool) -> dict[str, Any]:
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
