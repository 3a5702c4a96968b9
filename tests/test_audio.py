"""Decoding: every claimed format, any rate and channel count, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest

from optim.audio import SAMPLE_RATE, decode_audio
from optim.errors import AudioTooLong, CorruptAudio, EmptyAudio, UnsupportedAudio
from tests.audio_formats import FORMATS, encode_audio


@pytest.fixture(scope="module")
def speech(clips) -> np.ndarray:
    return decode_audio(clips["jfk"].data).samples


def test_real_files_of_each_shipped_kind(clips):
    for clip in clips.values():  # flac 44.1 kHz stereo, wav 22.05/16 kHz, mp3 48 kHz, ogg/opus 48 kHz
        audio = decode_audio(clip.data)
        assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
        assert audio.duration == pytest.approx(clip.duration, abs=0.08), clip.id
    jfk = decode_audio(clips["jfk"].data)
    assert (jfk.source_format, jfk.source_sample_rate, jfk.source_channels) == ("flac", 44_100, 2)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("channels", [1, 2])
def test_every_format_round_trips(speech, fmt, channels):
    container, codec, rate = FORMATS[fmt]
    audio = decode_audio(encode_audio(speech, container, codec, rate, channels))
    assert audio.source_sample_rate == rate and audio.source_channels == channels
    # lossy codecs add priming samples (AAC: 1024 at 44.1 kHz), so allow 0.1 s
    assert audio.duration == pytest.approx(len(speech) / SAMPLE_RATE, abs=0.1)
    # the same speech comes back: its loudness envelope matches, up to the codec's delay
    assert max(_envelope_correlation(audio.samples[lag:], speech) for lag in range(0, 1600, 160)) > 0.95


def _envelope_correlation(a: np.ndarray, b: np.ndarray, frame: int = 800) -> float:
    n = min(len(a), len(b)) // frame
    envelope = lambda x: np.sqrt((x[: n * frame].reshape(n, frame) ** 2).mean(axis=1))  # noqa: E731
    return float(np.corrcoef(envelope(a), envelope(b))[0, 1])


def test_resampling_keeps_pitch():
    rate = 44_100
    t = np.arange(rate) / rate
    tone = 0.5 * np.sin(2 * np.pi * 440.0 * t)
    stereo = encode_audio(np.interp(np.arange(SAMPLE_RATE) / SAMPLE_RATE, t, tone), "wav", "pcm_s16le", rate, 2)
    samples = decode_audio(stereo).samples
    spectrum = np.abs(np.fft.rfft(samples))
    peak_hz = np.argmax(spectrum) * SAMPLE_RATE / len(samples)
    assert abs(peak_hz - 440.0) < 2.0


def test_empty_input():
    with pytest.raises(EmptyAudio):
        decode_audio(b"")


@pytest.mark.parametrize(
    "data",
    [b"this is a text file, not audio\n" * 50, np.random.default_rng(0).bytes(200_000), b"\x89PNG\r\n\x1a\n" + bytes(100)],
    ids=["text", "random-bytes", "png-header"],
)
def test_not_audio(data):
    with pytest.raises(UnsupportedAudio):
        decode_audio(data)


def test_truncated_flac(clips):
    data = clips["jfk"].data
    with pytest.raises(CorruptAudio):
        decode_audio(data[: len(data) // 2])


def test_duration_limit(speech):
    wav = encode_audio(speech, "wav", "pcm_s16le")  # 11 s
    assert decode_audio(wav, max_seconds=12).duration == pytest.approx(11.0, abs=0.01)
    with pytest.raises(AudioTooLong, match="11.0 s long; the maximum is 5 s"):
        decode_audio(wav, max_seconds=5)
    # a stream whose header does not state the duration is cut off while decoding
    with pytest.raises(AudioTooLong):
        decode_audio(encode_audio(speech, "mp3", "libmp3lame", 44_100), max_seconds=5)
