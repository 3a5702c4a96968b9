"""Encode real speech into the containers the service claims to read (in memory, PyAV)."""

from __future__ import annotations

import io

import av
import numpy as np

from optim.audio import SAMPLE_RATE

# (container, codec, sample rate): every format named in the API docs, at typical rates.
FORMATS = {
    "wav": ("wav", "pcm_s16le", 16_000),
    "flac": ("flac", "flac", 44_100),
    "mp3": ("mp3", "libmp3lame", 44_100),
    "ogg-opus": ("ogg", "libopus", 48_000),
    "webm": ("webm", "libopus", 48_000),
    "m4a": ("ipod", "aac", 44_100),
    "aiff": ("aiff", "pcm_s16be", 22_050),
}


def encode_audio(samples: np.ndarray, container: str, codec: str, rate: int = SAMPLE_RATE, channels: int = 1) -> bytes:
    """Encode 16 kHz float samples into `container`/`codec` at `rate` Hz with `channels` channels."""
    planar = np.ascontiguousarray(np.tile(np.asarray(samples, dtype=np.float32), (channels, 1)))
    layout = "mono" if channels == 1 else "stereo"
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=layout)
        frame.sample_rate = SAMPLE_RATE
        # PyAV resamples to the codec's format/rate and re-frames to its frame size.
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()
