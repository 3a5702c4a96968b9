"""Voice activity detection and turn detection for streamed audio: Silero VAD (v6, the ONNX model
bundled in the `silero-vad` wheel, run by onnxruntime on one thread) and the turn logic of
OpenAI's `server_vad` (threshold, prefix padding, silence duration) on top of it.

Why ONNX on one thread: measured here on 16 kHz speech, one 32-ms frame at a time, the ONNX model
costs about 5 ms of CPU per second of audio against 13 ms for the TorchScript one on one torch
thread (the same probabilities to 1e-4), and onnxruntime with one intra-op thread runs on the
calling thread: a VAD call never competes with the Whisper worker's torch threads for a pool.
The model is loaded on first use (`SileroVAD.shared()`), not at import: it adds about 45 MB
(onnxruntime), which a server with no realtime session need not hold. The `silero_vad` package
itself is never imported (its import sets torch's thread count to 1 for the whole process):
only its data file is read.

Everything here is synchronous and works on 16 kHz float32 samples; the web shell runs it on a
thread of its own, off the event loop.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from optim.audio import SAMPLE_RATE

FRAME = 512  # samples per VAD frame at 16 kHz (32 ms): the size Silero v5/v6 takes
CONTEXT = 64  # samples of the previous frame the model sees before each frame
FRAME_MS = FRAME * 1000 // SAMPLE_RATE
NEGATIVE_MARGIN = 0.15  # below threshold - this, a frame counts as silence (Silero's VADIterator)
MIN_SPEECH_MS = 64  # speech must last this long (two frames above threshold) before a turn starts
PAUSE_MS = 200  # silence after which a turn may be ending: the shell may start its final decode early


def model_path(name: str = "silero_vad.onnx") -> Path:
    """The model file inside the installed `silero-vad` wheel, found without importing the package."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or spec.origin is None:
        raise RuntimeError("the silero-vad package is not installed (pip install silero-vad)")
    path = Path(spec.origin).parent / "data" / name
    if not path.is_file():
        raise RuntimeError(f"silero-vad has no {name} at {path}")
    return path


class SileroVAD:
    """The ONNX model, shared by every stream (onnxruntime's `run` is thread-safe); each stream
    keeps its own recurrent state."""

    _shared: "SileroVAD | None" = None
    _lock = threading.Lock()

    def __init__(self, path: Path | None = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        self.session = onnxruntime.InferenceSession(
            str(path or model_path()), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._rate = np.array(SAMPLE_RATE, dtype=np.int64)

    @classmethod
    def shared(cls) -> "SileroVAD":
        """One model per process, loaded on first use."""
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def stream(self) -> "VadStream":
        return VadStream(self)

    def frame(self, samples: np.ndarray, context: np.ndarray, state: np.ndarray) -> tuple[float, np.ndarray]:
        """Speech probability of one 512-sample frame, and the next state."""
        x = np.concatenate([context, samples])[None, :]
        out, state = self.session.run(None, {"input": x, "state": state, "sr": self._rate})
        return float(out[0, 0]), state


class VadStream:
    """One audio stream's VAD: frames cut from whatever sizes the samples come in, the recurrent
    state and context carried from frame to frame."""

    def __init__(self, model: SileroVAD):
        self.model = model
        self.state = np.zeros((2, 1, 128), dtype=np.float32)
        self.context = np.zeros(CONTEXT, dtype=np.float32)
        self.cpu_seconds = 0.0  # CPU time spent in the model (the calling thread's)
        self.audio_seconds = 0.0  # audio it has classified

    def probabilities(self, frames: np.ndarray) -> np.ndarray:
        """One probability per whole frame of `frames` (a multiple of FRAME samples)."""
        count = len(frames) // FRAME
        probs = np.empty(count, dtype=np.float32)
        started = time.thread_time()
        for i in range(count):
            frame = frames[i * FRAME : (i + 1) * FRAME]
            probs[i], self.state = self.model.frame(frame, self.context, self.state)
            self.context = frame[-CONTEXT:]
        self.cpu_seconds += time.thread_time() - started
        self.audio_seconds += count * FRAME / SAMPLE_RATE
        return probs


@dataclass(frozen=True)
class TurnConfig:
    """OpenAI's `server_vad` settings, and the longest turn."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    max_turn_seconds: float = 30.0
    min_speech_ms: int = MIN_SPEECH_MS
    pause_ms: int = PAUSE_MS

    @property
    def negative_threshold(self) -> float:
        return max(self.threshold - NEGATIVE_MARGIN, 0.01)


@dataclass(frozen=True)
class SpeechStarted:
    start: int  # stream sample where the turn's audio begins (the prefix padding included)
    speech: int  # stream sample of the first frame heard as speech


@dataclass(frozen=True)
class TurnEnded:
    start: int
    end: int  # stream sample after the turn's last (its trailing silence included)
    audio: np.ndarray = field(repr=False)
    forced: bool  # cut at the longest turn, speech going on


@dataclass(frozen=True)
class SpeechPaused:
    """The turn going on has had `pause_ms` of silence (every frame below `threshold - 0.15`): it
    ends here if the silence holds. `audio` is the turn so far, all its speech."""

    start: int
    at: int
    audio: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class SpeechResumed:
    """After a `SpeechPaused`, a frame that may be speech (at or above `threshold - 0.15`): the turn
    goes on, and the paused audio no longer holds all of it."""

    at: int


TurnEvent = SpeechStarted | TurnEnded | SpeechPaused | SpeechResumed


class TurnDetector:
    """Turns in a 16 kHz stream, frame by frame, as OpenAI's `server_vad` describes them:

    - a turn starts when `min_speech_ms` of consecutive frames are at or above `threshold`; its
      audio starts `prefix_padding_ms` before the first of them (never before the previous turn's
      end);
    - it ends once the frames have stayed below `threshold - 0.15` for `silence_duration_ms`
      (frames between the two thresholds neither end nor extend the silence, as in Silero's own
      VADIterator); its audio runs to there, the silence included;
    - a turn that reaches `max_turn_seconds` is cut there (`forced`), and if speech goes on the
      next turn starts at once, with no padding;
    - in between, `SpeechPaused` once `pause_ms` of true silence (every frame below
      `threshold - 0.15`) has followed the speech, and `SpeechResumed` if a frame at or above
      `threshold - 0.15` comes before the turn ends: what a shell needs to start the final decode
      while the silence is still being confirmed, and to drop it if the speaker goes on.

    Samples are classified in whole frames: up to 31 ms wait for the next push (`pending`)."""

    def __init__(self, vad: VadStream, config: TurnConfig, position: int = 0):
        self.vad = vad
        self.config = config
        self.position = position  # stream samples classified so far
        self._carry = np.zeros(0, dtype=np.float32)  # samples short of a whole frame
        pad = config.prefix_padding_ms * SAMPLE_RATE // 1000
        self._pad = pad
        self._ring = np.zeros(0, dtype=np.float32)  # the last `pad` (+ speech run) samples before a turn
        self._floor = position  # a turn's audio never starts before this (the previous turn's end)
        self._speech_run = 0  # consecutive frames at or above threshold, before a turn starts
        self._turn: list[np.ndarray] | None = None
        self._turn_start = 0
        self._turn_samples = 0
        self._silence_from: int | None = None
        self._quiet_from: int | None = None  # start of the run of frames all below the negative threshold
        self._paused = False
        self._pause_samples = config.pause_ms * SAMPLE_RATE // 1000
        self._min_speech_frames = max(1, -(-config.min_speech_ms // FRAME_MS))
        self._silence_samples = config.silence_duration_ms * SAMPLE_RATE // 1000
        self._max_turn_samples = int(config.max_turn_seconds * SAMPLE_RATE)

    @property
    def in_turn(self) -> bool:
        return self._turn is not None

    @property
    def turn_start(self) -> int:
        return self._turn_start

    @property
    def samples(self) -> int:
        """Classified samples of the turn going on (0 when there is none)."""
        return self._turn_samples if self._turn is not None else 0

    def turn_audio(self, include_pending: bool = True) -> np.ndarray:
        """The audio of the turn going on (empty when there is none)."""
        if self._turn is None:
            return np.zeros(0, dtype=np.float32)
        parts = [*self._turn, self._carry] if include_pending else self._turn
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    def end_turn(self) -> TurnEnded | None:
        """End the turn going on now (a client's commit), its pending samples included."""
        if self._turn is None:
            return None
        audio = self.turn_audio()
        end = self.position + len(self._carry)
        # The pending samples belong to this turn; the frame they start is still classified later.
        self._close(end)
        return TurnEnded(self._turn_start, end, audio, forced=False)

    def drop_turn(self) -> None:
        """Forget the turn going on (a client's clear)."""
        if self._turn is not None:
            self._close(self.position + len(self._carry))

    def _close(self, end: int) -> None:
        self._turn = None
        self._turn_samples = 0
        self._silence_from = None
        self._quiet_from = None
        self._paused = False
        self._speech_run = 0
        self._ring = np.zeros(0, dtype=np.float32)
        self._floor = end

    def push(self, samples: np.ndarray) -> list[TurnEvent]:
        data = np.concatenate([self._carry, samples]) if len(self._carry) else samples
        whole = len(data) // FRAME * FRAME
        self._carry = data[whole:].copy()
        if not whole:
            return []
        probs = self.vad.probabilities(data[:whole])
        events: list[TurnEvent] = []
        for i, p in enumerate(probs):
            frame = data[i * FRAME : (i + 1) * FRAME]
            frame_start = self.position
            self.position += FRAME
            if self._turn is None:
                self._idle_frame(frame, frame_start, p, events)
            else:
                self._turn_frame(frame, frame_start, p, events)
        return events

    def _idle_frame(self, frame: np.ndarray, frame_start: int, p: float, events: list[TurnEvent]) -> None:
        self._ring = np.concatenate([self._ring, frame])
        self._speech_run = self._speech_run + 1 if p >= self.config.threshold else 0
        keep = self._pad + self._speech_run * FRAME  # padding before the run, and the run itself
        if len(self._ring) > keep:
            self._ring = self._ring[len(self._ring) - keep :]
        if self._speech_run < self._min_speech_frames:
            return
        speech = self.position - self._speech_run * FRAME
        start = max(self.position - len(self._ring), self._floor)
        self._turn = [self._ring[len(self._ring) - (self.position - start) :]]
        self._turn_start = start
        self._turn_samples = self.position - start
        self._ring = np.zeros(0, dtype=np.float32)
        self._silence_from = None
        self._quiet_from = None
        self._paused = False
        events.append(SpeechStarted(start, speech))

    def _turn_frame(self, frame: np.ndarray, frame_start: int, p: float, events: list[TurnEvent]) -> None:
        assert self._turn is not None
        self._turn.append(frame)
        self._turn_samples += FRAME
        if p >= self.config.threshold:
            self._silence_from = None
        elif p < self.config.negative_threshold and self._silence_from is None:
            self._silence_from = frame_start
        if p < self.config.negative_threshold:
            if self._quiet_from is None:
                self._quiet_from = frame_start
        else:
            self._quiet_from = None
            if self._paused:
                self._paused = False
                events.append(SpeechResumed(frame_start))
        ended = self._silence_from is not None and self.position - self._silence_from >= self._silence_samples
        pause = (
            not ended and not self._paused and self._quiet_from is not None
            and self.position - self._quiet_from >= min(self._pause_samples, self._silence_samples)
        )
        if pause:
            self._paused = True
            events.append(SpeechPaused(self._turn_start, self.position, np.concatenate(self._turn)))
        forced = not ended and self._turn_samples >= self._max_turn_samples
        if not (ended or forced):
            return
        audio = np.concatenate(self._turn)
        start = self._turn_start
        self._close(self.position)
        events.append(TurnEnded(start, self.position, audio, forced))
        if forced and p >= self.config.negative_threshold:  # still speaking: the next turn starts here
            self._turn = []
            self._turn_start = self.position
            self._turn_samples = 0
            events.append(SpeechStarted(self.position, self.position))


class ManualBuffer:
    """Turn detection off (`turn_detection: null`): the audio since the last commit is one turn,
    which the client commits or clears itself. The same interface as `TurnDetector`."""

    def __init__(self, max_turn_seconds: float, position: int = 0):
        self.position = position
        self._parts: list[np.ndarray] = []
        self._start = position
        self.samples = 0
        self.max_samples = int(max_turn_seconds * SAMPLE_RATE)

    @property
    def in_turn(self) -> bool:
        return self.samples > 0

    @property
    def turn_start(self) -> int:
        return self._start

    def room(self) -> int:
        """Samples the buffer may still take."""
        return self.max_samples - self.samples

    def push(self, samples: np.ndarray) -> list[TurnEvent]:
        if len(samples):
            self._parts.append(samples)
            self.samples += len(samples)
            self.position += len(samples)
        return []

    def turn_audio(self, include_pending: bool = True) -> np.ndarray:
        return np.concatenate(self._parts) if self._parts else np.zeros(0, dtype=np.float32)

    def end_turn(self) -> TurnEnded | None:
        if not self.samples:
            return None
        ended = TurnEnded(self._start, self.position, self.turn_audio(), forced=False)
        self.drop_turn()
        return ended

    def drop_turn(self) -> None:
        self._parts = []
        self.samples = 0
        self._start = self.position
