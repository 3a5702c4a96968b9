"""Audio bytes → 16 kHz mono float32, in memory, with PyAV (FFmpeg's libraries; no ffmpeg
program and no temporary files). Any container/codec FFmpeg knows works: wav, flac, mp3,
ogg/opus, webm, m4a/aac, aiff, ...; any channel count and sample rate."""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np
import whisper.audio

from optim.errors import AudioTooLong, CorruptAudio, EmptyAudio, UnsupportedAudio

# 16 kHz, what Whisper's feature extractor expects: the one sample rate of the whole service.
SAMPLE_RATE: int = whisper.audio.SAMPLE_RATE


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # float32, mono, SAMPLE_RATE Hz, in [-1, 1]
    source_format: str
    source_sample_rate: int
    source_channels: int

    @property
    def duration(self) -> float:
        return len(self.samples) / SAMPLE_RATE


def decode_audio(data: bytes, max_seconds: float | None = None) -> Audio:
    """Decode a whole audio file held in memory.

    Raises an `AudioError` subclass (optim/errors.py) for empty, non-audio, corrupt or too-long input. The
    duration limit is enforced while decoding, so a very long file is rejected without
    holding all of its samples.
    """
    if not data:
        raise EmptyAudio("the uploaded file is empty")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise UnsupportedAudio("the file is not a recognised audio format") from e

    with container:
        if not container.streams.audio:
            raise UnsupportedAudio(f"the file ({container.format.name}) has no audio stream")
        stream = container.streams.audio[0]
        limit = None if max_seconds is None else int(max_seconds * SAMPLE_RATE)
        # The container often knows the duration up front: reject before decoding anything.
        if limit is not None and container.duration is not None and container.duration / av.time_base > max_seconds + 1:
            raise AudioTooLong(_too_long_message(container.duration / av.time_base, max_seconds))

        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        chunks: list[np.ndarray] = []
        total = 0
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunk = out.to_ndarray().reshape(-1)
                    chunks.append(chunk)
                    total += len(chunk)
                if limit is not None and total > limit:
                    raise AudioTooLong(_too_long_message(total / SAMPLE_RATE, max_seconds))
            for out in resampler.resample(None):  # flush the resampler's delay line
                chunks.append(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError as e:
            raise CorruptAudio(f"the {container.format.name} audio could not be decoded (truncated or damaged?): {e}") from e

        samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        if limit is not None and len(samples) > limit:
            raise AudioTooLong(_too_long_message(len(samples) / SAMPLE_RATE, max_seconds))
        if len(samples) == 0:
            raise EmptyAudio("the file contains no audio samples")
        return Audio(
            samples=np.clip(samples, -1.0, 1.0).astype(np.float32, copy=False),
            source_format=container.format.name,
            source_sample_rate=stream.codec_context.sample_rate or 0,
            source_channels=stream.codec_context.channels or 0,
        )


def _too_long_message(seconds: float, max_seconds: float) -> str:
    return f"the audio is {seconds:.1f} s long; the maximum is {max_seconds:g} s (setting MAX_AUDIO_SECONDS)"
