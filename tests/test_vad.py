"""The realtime audio path below the web shell: the streaming resampler (optim/pcm.py), Silero VAD
and the server_vad turn logic (optim/vad.py), in-process and fast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from optim.audio import SAMPLE_RATE, decode_audio
from optim.errors import InvalidRequest
from optim.pcm import Resampler, pcm16_to_float
from optim.vad import (
    FRAME,
    ManualBuffer,
    SileroVAD,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    TurnConfig,
    TurnDetector,
    TurnEnded,
)

DATA = Path(__file__).parent / "data"


def tone(freq: float, seconds: float, rate: int) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def test_resampler_keeps_the_band_and_removes_what_would_alias():
    for freq in (440.0, 3000.0, 7000.0):
        out = Resampler(24000).push(tone(freq, 1.0, 24000))
        ideal = 0.5 * np.sin(2 * np.pi * freq * np.arange(len(out)) / SAMPLE_RATE)
        assert np.sqrt(np.mean((out[200:-200] - ideal[200:-200]) ** 2)) < 1e-3, freq  # in phase, no delay
    for freq in (9000.0, 11000.0):  # above the 8-kHz Nyquist of the output: would fold back into speech
        out = Resampler(24000).push(tone(freq, 1.0, 24000))
        assert np.sqrt(np.mean(out[200:-200] ** 2)) < 0.5 * 10 ** (-70 / 20), freq


def test_resampler_chunk_by_chunk_equals_all_at_once():
    x = np.random.default_rng(0).standard_normal(24000 * 2).astype(np.float32)
    whole = Resampler(24000).push(x)
    r, parts, i = Resampler(24000), [], 0
    for n in np.random.default_rng(1).integers(1, 3000, size=200):
        parts.append(r.push(x[i : i + n]))
        i += n
        if i >= len(x):
            break
    chunked = np.concatenate(parts)
    assert len(chunked) == len(whole) and np.array_equal(chunked, whole)
    assert len(whole) == pytest.approx(len(x) * 2 / 3, abs=80)  # all but the filter's 4.5-ms reach
    assert np.array_equal(Resampler(16000).push(x[:100]), x[:100])  # 16 kHz passes through


def test_pcm16_decoding():
    assert np.array_equal(pcm16_to_float(np.array([0, 16384, -32768], "<i2").tobytes()), np.array([0, 0.5, -1], np.float32))
    with pytest.raises(InvalidRequest):
        pcm16_to_float(b"\x00\x01\x02")


class ScriptedVad:
    """A VadStream stand-in: one probability per frame, from a script."""

    def __init__(self, probabilities: list[float]):
        self.script = list(probabilities)
        self.cpu_seconds = 0.0

    def probabilities(self, frames: np.ndarray) -> np.ndarray:
        n = len(frames) // FRAME
        out, self.script = self.script[:n], self.script[n:]
        return np.array(out + [0.0] * (n - len(out)), dtype=np.float32)


def feed(detector: TurnDetector, frames: int, chunk: int = 700, pauses: bool = False) -> list:
    audio = np.arange(frames * FRAME, dtype=np.float32)  # sample values are their positions
    events = []
    for i in range(0, len(audio), chunk):
        events += detector.push(audio[i : i + chunk])
    return events if pauses else [e for e in events if isinstance(e, (SpeechStarted, TurnEnded))]


def test_turns_follow_threshold_padding_and_silence():
    # 20 frames of silence, 30 of speech (with one uncertain frame between the thresholds and one
    # short dip), 20 of silence; 32-ms frames.
    probs = [0.1] * 20 + [0.9] * 10 + [0.4] + [0.9] * 5 + [0.1] * 3 + [0.9] * 11 + [0.1] * 20
    config = TurnConfig(threshold=0.5, prefix_padding_ms=96, silence_duration_ms=320)  # 3 and 10 frames
    events = feed(TurnDetector(ScriptedVad(probs), config), len(probs), pauses=True)
    assert [type(e) for e in events] == [SpeechStarted, SpeechPaused, TurnEnded]  # the 96-ms dip is no pause
    started, paused, ended = events
    assert paused.at == 57 * FRAME and np.array_equal(paused.audio, np.arange(17 * FRAME, 57 * FRAME, dtype=np.float32))
    assert started.speech == 20 * FRAME and started.start == 17 * FRAME  # the padding before it
    assert ended.end == (50 + 10) * FRAME  # ten silent frames after the last speech frame
    assert not ended.forced
    assert np.array_equal(ended.audio, np.arange(17 * FRAME, 60 * FRAME, dtype=np.float32))  # contiguous, nothing lost


def test_a_pause_that_does_not_hold_is_resumed():
    """200 ms of silence pause the turn; a frame that may be speech (between the two thresholds)
    resumes it; the silence then holds and pauses it again, with the longer audio, then it ends."""
    probs = [0.9] * 10 + [0.0] * 8 + [0.4] + [0.0] * 20
    config = TurnConfig(prefix_padding_ms=0, silence_duration_ms=640)  # 20 frames
    events = feed(TurnDetector(ScriptedVad(probs), config), len(probs), pauses=True)
    assert [type(e) for e in events] == [SpeechStarted, SpeechPaused, SpeechResumed, SpeechPaused, TurnEnded]
    assert events[1].at == 17 * FRAME and events[2].at == 18 * FRAME and events[3].at == 26 * FRAME
    assert events[4].end == 30 * FRAME  # the uncertain frame did not restart the silence
    assert np.array_equal(events[3].audio, events[4].audio[: 26 * FRAME])


def test_a_single_loud_frame_starts_no_turn_and_padding_stops_at_the_last_turn():
    config = TurnConfig(prefix_padding_ms=1000, silence_duration_ms=96)
    probs = [0.9] + [0.0] * 10 + [0.9] * 4 + [0.0] * 4 + [0.9] * 4 + [0.0] * 4
    events = feed(TurnDetector(ScriptedVad(probs), config), len(probs))
    assert [type(e) for e in events] == [SpeechStarted, TurnEnded, SpeechStarted, TurnEnded]
    assert events[0].start == 0  # padding back to the stream's start, not before it
    assert events[2].start == events[1].end  # the second turn's padding never reaches into the first


def test_a_turn_at_the_longest_is_cut_and_speech_goes_on_in_the_next():
    config = TurnConfig(max_turn_seconds=10 * FRAME / SAMPLE_RATE, prefix_padding_ms=0)
    events = feed(TurnDetector(ScriptedVad([0.9] * 25 + [0.0] * 30), config), 55)
    kinds = [type(e).__name__ for e in events]
    assert kinds[:4] == ["SpeechStarted", "TurnEnded", "SpeechStarted", "TurnEnded"]
    assert events[1].forced and len(events[1].audio) == 10 * FRAME
    assert events[2].start == events[1].end


def test_end_turn_takes_the_pending_samples_and_manual_buffer():
    detector = TurnDetector(ScriptedVad([0.9] * 5), TurnConfig(prefix_padding_ms=0))
    detector.push(np.ones(5 * FRAME + 100, dtype=np.float32))
    assert detector.in_turn
    ended = detector.end_turn()
    assert ended is not None and len(ended.audio) == 5 * FRAME + 100 and not detector.in_turn

    buffer = ManualBuffer(max_turn_seconds=1.0)
    buffer.push(np.ones(800, dtype=np.float32))
    assert buffer.room() == SAMPLE_RATE - 800
    ended = buffer.end_turn()
    assert ended is not None and (ended.start, ended.end) == (0, 800) and buffer.samples == 0


def test_silero_hears_speech_and_not_silence_or_noise():
    speech = decode_audio((DATA / "LJ001-0002.wav").read_bytes()).samples
    quiet = np.concatenate([np.zeros(SAMPLE_RATE, np.float32), np.random.default_rng(0).normal(0, 0.003, 3 * SAMPLE_RATE).astype(np.float32)])
    config = TurnConfig()
    assert feed_samples(TurnDetector(SileroVAD.shared().stream(), config), quiet) == []
    events = feed_samples(TurnDetector(SileroVAD.shared().stream(), config), np.concatenate([quiet, speech, np.zeros(SAMPLE_RATE, np.float32)]))
    assert [type(e) for e in events if not isinstance(e, (SpeechPaused, SpeechResumed))] == [SpeechStarted, TurnEnded]
    assert abs(events[0].speech / SAMPLE_RATE - len(quiet) / SAMPLE_RATE) < 0.3


def feed_samples(detector: TurnDetector, samples: np.ndarray, chunk: int = 320) -> list:
    events = []
    for i in range(0, len(samples), chunk):
        events += detector.push(samples[i : i + chunk])
    return events


def test_the_vad_never_imports_the_silero_package():
    """Its import would set torch's thread count to 1 for the whole server."""
    import subprocess
    import sys

    code = "import sys, torch; n = torch.get_num_threads(); from optim.vad import SileroVAD; SileroVAD.shared(); " \
           "assert 'silero_vad' not in sys.modules; assert torch.get_num_threads() == n; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert result.stdout.strip() == "ok", result.stderr
