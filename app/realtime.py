"""Realtime transcription sessions: the transcription side of OpenAI's Realtime API, over one
WebSocket per session (GET /v1/realtime, routed by app/api/realtime.py).

Client events: `session.update` (GA shape, `session.type: "transcription"`), the beta
`transcription_session.update`, `input_audio_buffer.append` (base64 PCM16), `.commit`, `.clear`.
Server events: `session.created`, `session.updated` (`transcription_session.updated` for the beta
update), `input_audio_buffer.speech_started` / `speech_stopped` / `committed` / `cleared`,
`conversation.item.input_audio_transcription.delta` / `completed` / `failed`, and `error`. A bad
event gets an `error` event (with the offending event's `event_id`) and the session goes on.

One session, in order:
- appended audio is decoded and resampled to 16 kHz (optim/pcm.py) and, with `server_vad`, fed to
  Silero VAD and the turn detector (optim/vad.py), all on the hub's audio threads, off the event
  loop, by one task per session that takes every append waiting in one call (in order; under load
  the hops to the threads get fewer, not the audio later); a commit, clear or session.update
  waits for the audio sent before it;
- a turn (VAD: speech start to `silence_duration_ms` of silence; manual: append ... commit) is
  re-decoded every REALTIME_INTERIM_MS of new audio while it grows; the words two consecutive
  decodes agree on that extend what was sent go out as `delta`s (append-only). Interim decodes
  are speculative and give way: one is submitted only while no final decode is in flight, no
  window waits in the scheduler and fewer than a quarter of a batch of them are in flight (all
  sessions together), and every final decode submitted cancels the interim decodes in flight, so
  a final never waits behind them
  (the backpressure: under load a client gets fewer deltas, later; completed transcripts keep
  coming);
- the turn's final decode goes through the same `Scheduler.transcribe` as REST requests (batched
  with them): it is the `completed` transcript and is authoritative. With server_vad it starts
  early, once the VAD has heard 200 ms of silence (`SpeechPaused`: every frame since well below
  the threshold), over the turn's audio so far; if the silence holds until
  `silence_duration_ms`, what follows the pause is silence and that decode is the turn's, already
  under way; if a frame that may be speech comes first (`SpeechResumed`), it is cancelled and the
  turn goes on. When the final text extends the deltas sent, the rest goes out as a last delta
  first, so the deltas add up to the transcript; when it revised a word already sent, they do not;
- a disconnect cancels the session's decodes: their windows leave the scheduler's queue.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
from starlette.status import (
    WS_1000_NORMAL_CLOSURE,
    WS_1008_POLICY_VIOLATION,
    WS_1011_INTERNAL_ERROR,
    WS_1012_SERVICE_RESTART,
    WS_1013_TRY_AGAIN_LATER,
)
from starlette.websockets import WebSocket

from app.errors import error_object
from app.metrics import Metrics
from app.service import TranscriptionService
from app.settings import Settings
from app.shutdown import Shutdown
from optim.audio import SAMPLE_RATE
from optim.errors import InvalidRequest, Kind, ModelNotReady, PromptTooLong, ServiceError, UnsupportedOption
from optim.pcm import Resampler, pcm16_to_float
from optim.types import ModelRef, Transcript, TranscriptionOptions
from optim.vad import (
    ManualBuffer,
    SileroVAD,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    TurnConfig,
    TurnDetector,
    TurnEnded,
    TurnEvent,
)

log = logging.getLogger(__name__)

RATES = (24000, 16000)  # OpenAI's audio/pcm rate, and 16 kHz (our extension: no resampling)
DEFAULT_RATE = 24000
MIN_COMMIT_MS = 100  # OpenAI's: a manual commit needs at least this much audio
AUDIO_THREADS = 2  # decoding, resampling and VAD of every session's appends
_TURN = TurnConfig()  # OpenAI's server_vad defaults (optim/vad.py): threshold 0.5, 300 ms padding, 500 ms silence
DEFAULT_VAD = {
    "type": "server_vad",
    "threshold": _TURN.threshold,
    "prefix_padding_ms": _TURN.prefix_padding_ms,
    "silence_duration_ms": _TURN.silence_duration_ms,
}
MAX_PADDING_MS = 10_000
MAX_SILENCE_MS = 10_000
CLOSE_REASON_BYTES = 123  # a WebSocket close frame's reason


# ---------------------------------------------------------------- errors
class InvalidEvent(ServiceError):
    """A message that is not a client event at all (not JSON, not an object, a binary frame)."""

    code = "invalid_event"


class BufferEmpty(ServiceError):
    code = "input_audio_buffer_commit_empty"


class BufferFull(ServiceError):
    kind = Kind.TOO_LARGE
    code = "input_audio_buffer_full"

    def __init__(self, limit_s: float):
        super().__init__(
            f"the input audio buffer holds its limit of {limit_s:g} s (REALTIME_MAX_TURN_S); this audio was dropped: "
            "commit or clear the buffer first", "audio",
        )


class SessionLimit(ServiceError):
    kind = Kind.OVERLOADED
    code = "session_limit_reached"

    def __init__(self, limit: int):
        super().__init__(f"the server has its limit of {limit} realtime sessions open (MAX_REALTIME_SESSIONS); try again later")


class IdleTimeout(ServiceError):
    kind = Kind.TIMEOUT
    code = "idle_timeout"

    def __init__(self, seconds: float):
        super().__init__(f"no client event for {seconds:g} s (REALTIME_IDLE_TIMEOUT_S): the session is closed")


class InternalError(ServiceError):
    kind = Kind.OVERLOADED  # no kind stands for a bug; this one makes the event's type `server_error`
    code = "internal_error"

    def __init__(self) -> None:
        super().__init__("internal error; the server logged the details")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def ms(samples: int) -> int:
    return samples * 1000 // SAMPLE_RATE


def word_key(word: str) -> str:
    """What two decodes must agree on for a word: its letters and digits, in lower case (a comma
    or a capital that a longer decode adds does not revise the word)."""
    return re.sub(r"[^\w']+", "", word.lower())


def agreed_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ---------------------------------------------------------------- configuration
@dataclass(frozen=True)
class SessionConfig:
    """A session's effective configuration, validated; `ref` is None while its model is still
    loading (it is resolved again when a turn needs it)."""

    rate: int
    model: str | None  # as the client named it (None: DEFAULT_MODEL)
    ref: ModelRef | None
    language: str | None
    prompt: str | None
    turn: TurnConfig | None  # None: manual commits (`turn_detection: null`)

    @property
    def options(self) -> TranscriptionOptions:
        return TranscriptionOptions(language=self.language, prompt=self.prompt)


def default_settings(model: str | None = None) -> dict:
    """The `audio.input` object of a new session (OpenAI's defaults: 24 kHz PCM, server_vad)."""
    return {
        "format": {"type": "audio/pcm", "rate": DEFAULT_RATE},
        "transcription": {"model": model, "language": None, "prompt": None},
        "turn_detection": dict(DEFAULT_VAD),
    }


def merge(current: dict, update: dict) -> dict:
    """`session.update` semantics: fields present replace (objects field by field), `null` clears."""
    merged = dict(current)
    for key, value in update.items():
        if key == "turn_detection" and isinstance(value, dict) and current.get(key) is None:
            merged[key] = {**DEFAULT_VAD, **value}
        elif key == "transcription" and value is None:
            merged[key] = {"model": None, "language": None, "prompt": None}
        elif isinstance(value, dict) and isinstance(current.get(key), dict):
            merged[key] = merge(current[key], value)
        else:
            merged[key] = value
    return merged


def from_beta(session: dict) -> dict:
    """The beta `transcription_session.update` session, as a GA `audio.input` update."""
    update: dict = {}
    if "input_audio_format" in session:
        audio_format = session["input_audio_format"]
        if audio_format not in (None, "pcm16"):
            raise UnsupportedOption(
                f"input_audio_format {audio_format!r} is not supported: send pcm16 (24 kHz, 16-bit little-endian mono)",
                "session.input_audio_format",
            )
        update["format"] = {"type": "audio/pcm", "rate": DEFAULT_RATE}
    if "input_audio_transcription" in session:
        update["transcription"] = session["input_audio_transcription"]
    if "turn_detection" in session:
        update["turn_detection"] = session["turn_detection"]
    return update


def _field(obj: object, key: str, path: str) -> object:
    if not isinstance(obj, dict):
        raise InvalidRequest(f"{path} must be an object", path)
    return obj.get(key)


def _text(value: object, path: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(f"{path} must be a string", path)
    return value or None


def _number(settings: dict, key: str, path: str, low: float, high: float, integer: bool) -> float:
    value = settings.get(key, DEFAULT_VAD[key])
    value = DEFAULT_VAD[key] if value is None else value
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise InvalidRequest(f"{path}.{key} must be {kind} from {low:g} to {high:g}; got {value!r}", f"{path}.{key}")
    return value


def parse_turn_detection(value: object, max_turn_s: float) -> TurnConfig | None:
    path = "session.audio.input.turn_detection"
    if value is None:
        return None
    kind = _field(value, "type", path)
    if kind == "semantic_vad":
        raise UnsupportedOption(f"{path}.type semantic_vad is not supported: use server_vad, or null for manual commits", f"{path}.type")
    if kind not in (None, "server_vad"):
        raise InvalidRequest(f"{path}.type must be server_vad (or turn_detection null); got {kind!r}", f"{path}.type")
    assert isinstance(value, dict)
    return TurnConfig(
        threshold=float(_number(value, "threshold", path, 0.0, 1.0, integer=False)),
        prefix_padding_ms=int(_number(value, "prefix_padding_ms", path, 0, MAX_PADDING_MS, integer=True)),
        silence_duration_ms=int(_number(value, "silence_duration_ms", path, 0, MAX_SILENCE_MS, integer=True)),
        max_turn_seconds=max_turn_s,
    )


def parse_format(value: object) -> int:
    path = "session.audio.input.format"
    if value is None:
        return DEFAULT_RATE
    kind = _field(value, "type", path)
    if kind not in (None, "audio/pcm"):
        raise UnsupportedOption(
            f"audio format {kind!r} is not supported: send audio/pcm (16-bit little-endian mono) at 24000 Hz, or at 16000 Hz",
            f"{path}.type",
        )
    rate = _field(value, "rate", path)
    rate = DEFAULT_RATE if rate is None else rate
    if isinstance(rate, bool) or rate not in RATES:
        raise InvalidRequest(f"{path}.rate must be 24000 (OpenAI's) or 16000; got {rate!r}", f"{path}.rate")
    return int(rate)


# ---------------------------------------------------------------- audio input
class AudioInput:
    """A session's audio path, run on the hub's audio threads: PCM16 → float → 16 kHz → turns."""

    def __init__(self, rate: int, turn: TurnConfig | None, max_turn_s: float, position: int = 0):
        self.resampler = Resampler(rate)
        self.rate = rate
        self.vad = SileroVAD.shared().stream() if turn is not None else None
        self.turns: TurnDetector | ManualBuffer = (
            TurnDetector(self.vad, turn, position) if self.vad is not None and turn is not None else ManualBuffer(max_turn_s, position)
        )
        self.max_turn_s = max_turn_s

    def push(self, chunks: list[bytes]) -> tuple[list[tuple[int, TurnEvent]], list[tuple[int, ServiceError]], float]:
        """Appended chunks, in order, in one call (one hop to this thread for all that waited): the
        turn events they bring, each with the index of the chunk it came with, the chunks refused
        (a full manual buffer), and the CPU seconds the VAD spent."""
        events: list[tuple[int, TurnEvent]] = []
        refused: list[tuple[int, ServiceError]] = []
        before = self.vad.cpu_seconds if self.vad is not None else 0.0
        for index, pcm in enumerate(chunks):
            samples = self.resampler.push(pcm16_to_float(pcm))
            if isinstance(self.turns, ManualBuffer) and len(samples) > self.turns.room():
                refused.append((index, BufferFull(self.max_turn_s)))
                continue
            events += [(index, event) for event in self.turns.push(samples)]
        return events, refused, (self.vad.cpu_seconds - before) if self.vad is not None else 0.0


@dataclass(eq=False)
class _Turn:
    """A turn being spoken (an item not committed yet), and what its interim decodes sent."""

    item_id: str
    heard_at: float  # when its speech was first heard (the append that started it)
    interim: asyncio.Task | None = None
    decoding: bool = False  # the interim task is still waiting for its decode
    interim_at: int = 0  # turn samples at the last interim decode (or skip)
    previous: list[str] = field(default_factory=list)  # the last interim decode's words (word_key)
    sent: list[str] = field(default_factory=list)  # the words sent as deltas (word_key)
    delta_sent: bool = False
    closed: bool = False  # committed or cleared: no more deltas from interim decodes
    preempted: bool = False  # its interim decode was cancelled for another turn's final
    early: asyncio.Task | None = None  # the final decode started at a pause (server_vad), if the pause holds


# ---------------------------------------------------------------- sessions
class RealtimeHub:
    """What all sessions share: the audio threads, the session count and limit."""

    def __init__(self, service: TranscriptionService, settings: Settings, metrics: Metrics, shutdown: Shutdown):
        self.service = service
        self.settings = settings
        self.metrics = metrics
        self.shutdown = shutdown
        self.executor = ThreadPoolExecutor(max_workers=AUDIO_THREADS, thread_name_prefix="realtime-audio")
        self.sessions: set[RealtimeSession] = set()
        self.interims: set[_Turn] = set()  # turns with an interim decode in flight
        self.finals = 0  # final decodes in flight (early ones included)

    @property
    def interim_slots(self) -> int:
        """Interim decodes in flight at once, all sessions together: a quarter of a batch."""
        return max(1, self.service.scheduler.config.max_batch_size // 4)

    def saturated(self) -> bool:
        """No room for an interim decode: a final decode is in flight (it would cancel the interim
        anyway), a window is waiting in the scheduler (a REST request, ...), or the interim slots
        are taken."""
        return self.finals > 0 or self.service.scheduler.queued_windows > 0 or len(self.interims) >= self.interim_slots

    def preempt(self, keep: "_Turn | None" = None) -> None:
        """A final decode was submitted: every interim decode still decoding (but `keep`'s) gives
        way to it (cancelled, its windows leave the queue and its rows the running batch)."""
        for turn in list(self.interims):
            if turn is not keep and turn.decoding and not turn.closed and turn.interim is not None:
                turn.interim.cancel()
                turn.preempted = True

    async def serve(self, websocket: WebSocket, model: str | None, intent: str | None) -> None:
        offered = websocket.scope.get("subprotocols") or []
        await websocket.accept(subprotocol="realtime" if "realtime" in offered else None)
        refusal: tuple[ServiceError, int] | None = None
        if self.shutdown.draining:
            refusal = self.shutdown.error(), WS_1012_SERVICE_RESTART
        elif len(self.sessions) >= self.settings.max_realtime_sessions:
            refusal = SessionLimit(self.settings.max_realtime_sessions), WS_1013_TRY_AGAIN_LATER
        elif intent not in (None, "", "transcription"):
            error = UnsupportedOption(f"intent {intent!r} is not served: this server serves transcription sessions only (intent=transcription)", "intent")
            refusal = error, WS_1008_POLICY_VIOLATION
        if refusal is not None:
            error, code = refusal
            session = RealtimeSession(websocket, self, initial_model=None, resolve=False)
            await session.send_error(error)
            await session.close(code, error.message)
            return
        session = RealtimeSession(websocket, self, initial_model=model)
        self.sessions.add(session)
        self.metrics.realtime_sessions.set(len(self.sessions))
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            self.metrics.realtime_sessions.set(len(self.sessions))

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class RealtimeSession:
    def __init__(self, websocket: WebSocket, hub: RealtimeHub, initial_model: str | None, resolve: bool = True):
        self.ws = websocket
        self.hub = hub
        self.service = hub.service
        self.settings = hub.settings
        self.metrics = hub.metrics
        self.id = new_id("sess")
        self.closed = False
        self._send_lock = asyncio.Lock()
        self.tasks: set[asyncio.Task] = set()
        self.turn: _Turn | None = None
        self.last_item: str | None = None
        self.initial_error: ServiceError | None = None
        self.interim_samples = int(self.settings.realtime_interim_ms * SAMPLE_RATE / 1000)
        self.raw = default_settings(initial_model)
        self.config = SessionConfig(DEFAULT_RATE, None, None, None, None, None)
        self.input: AudioInput | None = None
        # Appends waiting for the audio threads, (pcm, received, event_id); processed in order by
        # one task, all that waited in one call: under load the hops to the threads get fewer.
        self._appended: list[tuple[bytes, float, str | None]] = []
        self._appended_ready = asyncio.Event()
        self._audio_idle = asyncio.Event()
        self._audio_idle.set()
        if not resolve:
            return
        try:
            self.config = self.build(self.raw)
        except ServiceError as e:  # an unknown ?model=: say so, and serve the default
            self.initial_error = e
            self.raw = default_settings(None)
            self.config = self.build(self.raw)

    # ------------------------------------------------------------ configuration
    def build(self, raw: dict) -> SessionConfig:
        """Validate an `audio.input` object and resolve its model: a SessionConfig, or a ServiceError."""
        rate = parse_format(raw.get("format"))
        turn = parse_turn_detection(raw.get("turn_detection"), self.settings.realtime_max_turn_s)
        transcription = raw.get("transcription") or {}
        path = "session.audio.input.transcription"
        model = _text(_field(transcription, "model", path), f"{path}.model")
        language = _text(transcription.get("language"), f"{path}.language")
        prompt = _text(transcription.get("prompt"), f"{path}.prompt")
        if prompt is not None and len(prompt) > self.settings.max_prompt_chars:
            error = PromptTooLong(len(prompt), self.settings.max_prompt_chars)
            error.param = f"{path}.prompt"
            raise error
        config = SessionConfig(rate, model, None, language, prompt, turn)
        try:
            ref = self.service.resolve_model(model)
            self.service.engine.check(ref, config.options)
        except ModelNotReady:
            return config  # resolved when a turn needs it
        except ServiceError as e:
            e.param = f"{path}.{e.param or 'model'}"
            raise
        return replace(config, ref=ref)

    def session_object(self) -> dict:
        """The effective configuration, in the shape of OpenAI's transcription session."""
        config = self.config
        turn = config.turn
        return {
            "type": "transcription",
            "object": "realtime.transcription_session",
            "id": self.id,
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": config.rate},
                    "transcription": {
                        "model": str(config.ref) if config.ref is not None else config.model,
                        "language": config.language,
                        "prompt": config.prompt or "",
                    },
                    "noise_reduction": None,
                    "turn_detection": None if turn is None else {
                        "type": "server_vad",
                        "threshold": turn.threshold,
                        "prefix_padding_ms": turn.prefix_padding_ms,
                        "silence_duration_ms": turn.silence_duration_ms,
                    },
                }
            },
            "include": None,
        }

    def beta_session_object(self) -> dict:
        ga = self.session_object()["audio"]["input"]
        return {
            "id": self.id,
            "object": "realtime.transcription_session",
            "client_secret": {"value": "", "expires_at": 0},  # none: the API key authenticates (no ephemeral keys here)
            "input_audio_format": "pcm16",
            # the name as the client gave it: the beta type knows only OpenAI's names (whisper-1 is DEFAULT_MODEL)
            "input_audio_transcription": {**ga["transcription"], "model": self.config.model or "whisper-1"},
            "turn_detection": ga["turn_detection"],
            "modalities": ["text"],
        }

    # ------------------------------------------------------------ sending
    async def send(self, event: dict) -> bool:
        event = {"event_id": new_id("event"), **event}
        async with self._send_lock:
            if self.closed:
                return False
            try:
                await self.ws.send_text(json.dumps(event))
                return True
            except (RuntimeError, OSError):  # the client is gone (uvicorn's ClientDisconnected is an OSError)
                self.closed = True
                return False

    async def send_error(self, error: ServiceError, event_id: str | None = None) -> None:
        await self.send({"type": "error", "error": {**error_object(error), "event_id": event_id}})

    async def close(self, code: int, reason: str) -> None:
        async with self._send_lock:
            if self.closed:
                return
            self.closed = True
            try:
                await self.ws.close(code, reason.encode()[:CLOSE_REASON_BYTES].decode(errors="ignore"))
            except (RuntimeError, OSError):
                pass

    async def new_input(self, position: int = 0) -> AudioInput:
        """The audio path for the current configuration; built on an audio thread, because the first
        server_vad session of the process loads the VAD model there."""
        config, limit = self.config, self.settings.realtime_max_turn_s
        return await asyncio.get_running_loop().run_in_executor(
            self.hub.executor, lambda: AudioInput(config.rate, config.turn, limit, position)
        )

    # ------------------------------------------------------------ the receive loop
    async def run(self) -> None:
        self.input = await self.new_input()
        self._spawn(self.process_audio())
        await self.send({"type": "session.created", "session": self.session_object()})
        if self.initial_error is not None:
            await self.send_error(self.initial_error)
        idle = self.settings.realtime_idle_timeout_s
        try:
            while not self.closed:
                try:
                    message = await asyncio.wait_for(self.ws.receive(), idle)
                except asyncio.TimeoutError:
                    error = IdleTimeout(idle)
                    await self.send_error(error)
                    await self.close(WS_1000_NORMAL_CLOSURE, f"idle timeout: no client event for {idle:g} s")
                    return
                if message["type"] == "websocket.disconnect":
                    self.closed = True
                    return
                await self.dispatch(message)
        except (RuntimeError, OSError):  # the connection broke under us
            self.closed = True
        finally:
            await self.cleanup()

    async def cleanup(self) -> None:
        """The client is gone: its decodes are cancelled, so their windows leave the queue."""
        self.closed = True
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def dispatch(self, message: dict) -> None:
        event_id = None
        try:
            event = self.parse(message)
            event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            handler = self.HANDLERS.get(event.get("type"))
            if handler is None:
                kind = event.get("type")
                raise InvalidRequest(
                    f"unknown or unsupported event type {kind!r}; a transcription session takes {', '.join(self.HANDLERS)}",
                    "type",
                )
            await handler(self, event)
        except ServiceError as e:
            await self.send_error(e, event_id)
        except Exception:
            log.exception("realtime session %s: unexpected error handling an event", self.id)
            await self.send_error(InternalError(), event_id)

    @staticmethod
    def parse(message: dict) -> dict:
        text = message.get("text")
        if text is None:
            raise InvalidEvent("binary frames are not events: send each event as a JSON text frame")
        try:
            event = json.loads(text)
        except ValueError as e:
            raise InvalidEvent(f"the message is not valid JSON: {e}") from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise InvalidEvent("an event is a JSON object with a string `type`")
        return event

    # ------------------------------------------------------------ client events
    async def on_session_update(self, event: dict, beta: bool = False) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise InvalidRequest(f"{event['type']} needs a `session` object", "session")
        if beta:
            update = from_beta(session)
        else:
            kind = session.get("type")
            if kind not in (None, "transcription"):
                raise UnsupportedOption(
                    f"session.type {kind!r} is not served: this server serves transcription sessions only (\"transcription\")",
                    "session.type",
                )
            audio = session.get("audio") or {}
            update = _field(audio, "input", "session.audio") or {}
            if not isinstance(update, dict):
                raise InvalidRequest("session.audio.input must be an object", "session.audio.input")
        raw = merge(self.raw, update)
        config = self.build(raw)
        await self.audio_processed()  # the audio sent before the update, under the old configuration
        reset = (config.rate, config.turn) != (self.config.rate, self.config.turn)
        self.raw, self.config = raw, config
        if reset:  # a new format or turn detection: the uncommitted audio is dropped
            self._drop_turn()
            self.input = await self.new_input(self.input.turns.position if self.input is not None else 0)
        if beta:
            await self.send({"type": "transcription_session.updated", "session": self.beta_session_object()})
        else:
            await self.send({"type": "session.updated", "session": self.session_object()})

    async def on_beta_update(self, event: dict) -> None:
        await self.on_session_update(event, beta=True)

    async def on_append(self, event: dict) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise InvalidRequest("input_audio_buffer.append needs `audio`: base64 of 16-bit little-endian mono PCM", "audio")
        try:
            pcm = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("`audio` is not valid base64", "audio") from None
        if len(pcm) % 2:
            raise InvalidRequest(f"`audio` must be whole 16-bit samples; it decodes to {len(pcm)} bytes, an odd count", "audio")
        if not pcm:
            return
        event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        self._appended.append((pcm, time.perf_counter(), event_id))
        self._audio_idle.clear()
        self._appended_ready.set()

    async def audio_processed(self) -> None:
        """Wait until every append so far has been through the audio path (commit, clear and
        session.update act on the audio sent before them)."""
        await self._audio_idle.wait()

    async def process_audio(self) -> None:
        """The session's audio task: appends in order, every batch that waited in one call."""
        while True:
            await self._appended_ready.wait()
            self._appended_ready.clear()
            while self._appended:
                batch, self._appended = self._appended, []
                try:
                    await self._process(batch)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("realtime session %s: processing audio failed", self.id)
                    await self.send_error(InternalError(), batch[0][2])
            self._audio_idle.set()

    async def _process(self, batch: list[tuple[bytes, float, str | None]]) -> None:
        assert self.input is not None
        audio_input = self.input
        chunks = [pcm for pcm, _, _ in batch]
        events, refused, vad_seconds = await asyncio.get_running_loop().run_in_executor(self.hub.executor, audio_input.push, chunks)
        refused_chunks = {index for index, _ in refused}
        accepted = sum(len(pcm) for index, pcm in enumerate(chunks) if index not in refused_chunks)
        self.metrics.realtime_audio_seconds.inc(accepted / 2 / audio_input.rate)
        if vad_seconds:
            self.metrics.realtime_vad_seconds.inc(vad_seconds)
        for index, error in refused:
            await self.send_error(error, batch[index][2])
        if isinstance(audio_input.turns, ManualBuffer) and self.turn is None and audio_input.turns.in_turn:
            self.turn = _Turn(new_id("item"), batch[0][1])
        for index, turn_event in events:
            received = batch[index][1]  # when the chunk that brought the event arrived
            if isinstance(turn_event, SpeechPaused) and self.turn is not None:
                self.start_early_final(self.turn, turn_event.audio)
            elif isinstance(turn_event, SpeechResumed) and self.turn is not None:
                self.cancel_early_final(self.turn)
            elif isinstance(turn_event, SpeechStarted):
                self.turn = _Turn(new_id("item"), received)
                await self.send({
                    "type": "input_audio_buffer.speech_started",
                    "audio_start_ms": ms(turn_event.start),
                    "item_id": self.turn.item_id,
                })
            elif isinstance(turn_event, TurnEnded):
                await self.commit(turn_event, received, vad=True)
        self.maybe_interim()

    async def on_commit(self, event: dict) -> None:
        await self.audio_processed()
        assert self.input is not None
        turns = self.input.turns
        if isinstance(turns, ManualBuffer):
            if ms(turns.samples) < MIN_COMMIT_MS:
                raise BufferEmpty(
                    f"the input audio buffer holds {ms(turns.samples)} ms of audio; a commit needs at least {MIN_COMMIT_MS} ms"
                )
        elif not turns.in_turn:
            raise BufferEmpty(
                "no speech is being heard, so there is nothing to commit: with server_vad the buffer holds audio only while "
                "speech goes on, and turns are committed when it stops"
            )
        ended = turns.end_turn()
        assert ended is not None
        await self.commit(ended, time.perf_counter(), vad=False)

    async def on_clear(self, event: dict) -> None:
        await self.audio_processed()
        self._drop_turn()
        await self.send({"type": "input_audio_buffer.cleared"})

    HANDLERS = {
        "session.update": on_session_update,
        "transcription_session.update": on_beta_update,
        "input_audio_buffer.append": on_append,
        "input_audio_buffer.commit": on_commit,
        "input_audio_buffer.clear": on_clear,
    }

    # ------------------------------------------------------------ turns
    def _drop_turn(self) -> None:
        if self.input is not None:
            self.input.turns.drop_turn()
        turn, self.turn = self.turn, None
        if turn is not None:
            turn.closed = True
            if turn.interim is not None and turn.decoding:
                turn.interim.cancel()
            self.cancel_early_final(turn)

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def commit(self, ended: TurnEnded, ended_at: float, vad: bool) -> None:
        turn, self.turn = self.turn, None
        if turn is None:
            turn = _Turn(new_id("item"), ended_at)
        turn.closed = True
        if turn.interim is not None and turn.decoding:
            turn.interim.cancel()  # its windows leave the queue; the final decode replaces it
        if vad:
            await self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": ms(ended.end), "item_id": turn.item_id})
        await self.send({"type": "input_audio_buffer.committed", "item_id": turn.item_id, "previous_item_id": self.last_item})
        self.last_item = turn.item_id
        self.hub.preempt()
        self._spawn(self.finish(turn, ended.audio, ended_at))

    def model_ref(self) -> ModelRef:
        if self.config.ref is None:  # the model was loading when the session was configured
            ref = self.service.resolve_model(self.config.model)
            self.config = replace(self.config, ref=ref)
        assert self.config.ref is not None
        return self.config.ref

    def start_early_final(self, turn: _Turn, audio: np.ndarray) -> None:
        """The turn's final decode, started at a pause (it is used if the pause becomes the turn's end)."""
        if turn.early is not None or turn.closed or self.config.ref is None:
            return
        self.hub.preempt(keep=turn)  # its own interim decode may finish: the speaker may go on
        turn.early = self._spawn(self.final_decode(self.config.ref, audio))

    def cancel_early_final(self, turn: _Turn) -> None:
        if turn.early is not None:
            turn.early.cancel()  # the speaker went on: its windows leave the queue
            turn.early = None

    async def finish(self, turn: _Turn, audio: np.ndarray, ended_at: float) -> None:
        """The final decode of a committed turn: the authoritative transcript. Started at the pause
        that ended the turn (`turn.early`: the audio after it is silence), or now."""
        if turn.interim is not None:  # let it leave first: its deltas come before the completed
            await asyncio.gather(turn.interim, return_exceptions=True)
        try:
            ref = self.model_ref()
            transcript = None
            if turn.early is not None:
                try:
                    transcript = await turn.early
                except ServiceError:  # (refused at the pause, say: a full queue) once more, now
                    pass
            if transcript is None:
                transcript = await self.final_decode(ref, audio)
        except ServiceError as e:
            await self.send({
                "type": "conversation.item.input_audio_transcription.failed",
                "item_id": turn.item_id,
                "content_index": 0,
                "error": error_object(e),
            })
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("realtime session %s: transcribing item %s failed", self.id, turn.item_id)
            await self.send({
                "type": "conversation.item.input_audio_transcription.failed",
                "item_id": turn.item_id,
                "content_index": 0,
                "error": error_object(InternalError()),
            })
            return
        text = transcript.text.strip()
        words = text.split()
        sent = len(turn.sent)
        if len(words) > sent and [word_key(w) for w in words[:sent]] == turn.sent:
            # the rest, so that the deltas add up to the transcript's words
            await self.send_delta(turn, (" " if sent else "") + " ".join(words[sent:]))
        await self.send({
            "type": "conversation.item.input_audio_transcription.completed",
            "item_id": turn.item_id,
            "content_index": 0,
            "transcript": text,
            "usage": {"type": "duration", "seconds": round(len(audio) / SAMPLE_RATE, 3)},
        })
        self.metrics.realtime_turn_seconds.observe(time.perf_counter() - ended_at)

    async def final_decode(self, ref: ModelRef, audio: np.ndarray) -> Transcript:
        self.hub.finals += 1
        try:
            transcript, _ = await self.service.scheduler.transcribe(ref, audio, self.config.options)
            return transcript
        finally:
            self.hub.finals -= 1

    async def send_delta(self, turn: _Turn, delta: str) -> None:
        await self.send({
            "type": "conversation.item.input_audio_transcription.delta",
            "item_id": turn.item_id,
            "content_index": 0,
            "delta": delta,
        })
        if not turn.delta_sent:
            turn.delta_sent = True
            self.metrics.realtime_first_delta_seconds.observe(time.perf_counter() - turn.heard_at)

    def maybe_interim(self) -> None:
        """Re-decode the turn being spoken when it has grown by REALTIME_INTERIM_MS since the last
        try, unless the previous interim decode is still running or the engine is saturated."""
        turn = self.turn
        if turn is None or not self.interim_samples or self.input is None or self.config.ref is None:
            return
        if turn.interim is not None and not turn.interim.done() or turn.early is not None:
            return  # one at a time; none while the final decode is already under way
        grown = self.input.turns.samples
        if grown - turn.interim_at < self.interim_samples:
            return
        if self.hub.saturated():  # no room now: try again after a quarter of the interval
            turn.interim_at = grown - self.interim_samples + self.interim_samples // 4
            self.metrics.realtime_interim.labels("skipped").inc()
            return
        turn.interim_at = grown
        self.metrics.realtime_interim.labels("run").inc()
        turn.decoding = True
        turn.preempted = False
        self.hub.interims.add(turn)
        turn.interim = self._spawn(self.interim(turn, self.config.ref, self.input.turns.turn_audio()))

    async def interim(self, turn: _Turn, ref: ModelRef, audio: np.ndarray) -> None:
        try:
            transcript, _ = await self.service.scheduler.transcribe(ref, audio, self.config.options)
        except ServiceError:
            return  # (a full queue, say): no delta this time; the final decode still comes
        except asyncio.CancelledError:
            if turn.preempted:  # it gave way to another turn's final: this turn tries again with its next audio
                self.metrics.realtime_interim.labels("preempted").inc()
                turn.interim_at = 0
            raise
        except Exception:
            log.exception("realtime session %s: an interim decode failed", self.id)
            return
        finally:
            turn.decoding = False
            self.hub.interims.discard(turn)
        if turn.closed:
            return
        words = transcript.text.split()
        keys = [word_key(w) for w in words]
        # The words this decode and the last one agree on, but never this decode's last word: it
        # may be cut off at the edge of the audio so far ("concern" for "concerned").
        agreed = min(agreed_prefix(keys, turn.previous), len(keys) - 1)
        turn.previous = keys
        sent = len(turn.sent)
        if agreed > sent and keys[:sent] == turn.sent:  # append-only: never a word that revises one sent
            turn.sent = keys[:agreed]
            await self.send_delta(turn, (" " if sent else "") + " ".join(words[sent:agreed]))
