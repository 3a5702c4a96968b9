"""Encode real speech into the containers the service claims to read (in memory, PyAV)."""

from __future__ import annotations

import io
import struct

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
    # the rest of the containers optim.audio.FORMATS lets in, with common codecs (not ape: no
    # encoder here; not amr: its encoder is mono only)
    "wav-float": ("wav", "pcm_f32le", 48_000),
    "wav-u8": ("wav", "pcm_u8", 11_025),
    "wav-mulaw": ("wav", "pcm_mulaw", 8_000),
    "w64": ("w64", "pcm_s24le", 48_000),
    "caf-alac": ("caf", "alac", 44_100),
    "au": ("au", "pcm_s16be", 8_000),
    "aac-adts": ("adts", "aac", 22_050),
    "ac3": ("ac3", "ac3", 48_000),
    "eac3": ("eac3", "eac3", 48_000),
    "mov-alac": ("mov", "alac", 44_100),
    "3gp": ("3gp", "aac", 16_000),
    "mkv-aac": ("matroska", "aac", 44_100),
    "mpeg-ts": ("mpegts", "mp2", 48_000),
    "mpeg-ps": ("vob", "mp2", 48_000),
    "avi": ("avi", "pcm_s16le", 22_050),
    "asf": ("asf", "libmp3lame", 44_100),
    "wavpack": ("wv", "wavpack", 44_100),
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


def pcm_wav(samples: np.ndarray, rate: int, channels: int = 1, chunks: bytes = b"") -> bytes:
    """A WAV file written by hand, so its header can say what no encoder would write (a rate of
    1 Hz, 32 channels with no speaker positions, NaN floats). `samples` are interleaved, in the
    file's own sample type: int16 is format tag 1 (PCM), float32 tag 3 (IEEE float). `chunks` go
    between the format and the data (a LIST of tags)."""
    samples = np.ascontiguousarray(samples)
    tag = {np.dtype("<i2"): 1, np.dtype("<f4"): 3}[samples.dtype]
    width = samples.dtype.itemsize
    fmt = struct.pack("<HHIIHH", tag, channels, rate, (rate * channels * width) % 2**32, channels * width, 8 * width)
    data = samples.tobytes()
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + chunks + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body
