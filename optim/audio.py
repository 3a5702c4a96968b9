"""Audio bytes → 16 kHz mono float32, in memory, with PyAV (FFmpeg's libraries; no ffmpeg
program and no temporary files). The common audio and video containers work (`FORMATS`: wav,
flac, mp3, ogg/opus, webm, m4a/aac, aiff, ...), with any channel count up to `MAX_CHANNELS` and
any sample rate in `SAMPLE_RATES`.

The upload is hostile: FFmpeg may only read it with a demuxer from `FORMATS`, may open nothing
else (no file, no socket), and decoding stops at the duration limit whatever the header says."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import av
import numpy as np
import whisper.audio

from optim.errors import AudioOutOfRange, AudioTooLong, CorruptAudio, EmptyAudio, NonFiniteAudio, UnsupportedAudio

# 16 kHz, what Whisper's feature extractor expects: the one sample rate of the whole service.
SAMPLE_RATE: int = whisper.audio.SAMPLE_RATE

# The demuxers an upload may be read with: real audio and video containers, none of which opens
# another input. FFmpeg matches each against a demuxer's comma-separated names ("mov" lets in
# "mov,mp4,m4a,3gp,3g2,mj2", "matroska" "matroska,webm"). Left out on purpose: concat (an ffconcat
# text file decodes files from this server's disk), hls and dash (playlists of file://, http:// or
# relative URLs), sdp/rtp/rtsp (bind UDP sockets and hold the thread ~20 s), image2 (file-name
# patterns), and the other ~380 demuxers, attack surface no speech upload needs.
FORMATS = ("wav", "w64", "flac", "mp3", "ogg", "matroska", "mov", "aiff", "aac", "ac3", "eac3", "caf",
           "amr", "au", "avi", "wv", "ape", "asf", "mpeg", "mpegts")  # fmt: skip
_OPEN_OPTIONS = {
    "format_whitelist": ",".join(FORMATS),
    # The upload itself comes through PyAV's in-memory reader, which is no protocol; any other open
    # (a concat or playlist entry, RTP's UDP ports, a QuickTime data reference) needs one, and no
    # protocol is called "none". Demuxers pass both lists on to the inputs they open.
    "protocol_whitelist": "none",
}
MAX_CHANNELS = 64  # a microphone array; FFmpeg itself stops at 512
SAMPLE_RATES = range(1_000, 768_001)  # 1 Hz audio would resample 16000-fold; 768 kHz is the top PCM rate


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # float32, mono, SAMPLE_RATE Hz, in [-1, 1]
    source_format: str
    source_sample_rate: int
    source_channels: int

    @property
    def duration(self) -> float:
        return len(self.samples) / SAMPLE_RATE


def decode_audio(data: bytes, max_seconds: float | None = None, grow: Callable[[int], None] | None = None) -> Audio:
    """Decode a whole audio file held in memory.

    Raises an `AudioError` subclass (optim/errors.py) for empty, non-audio, corrupt, out-of-range
    or too-long input, never another exception. The duration limit is enforced while decoding, so
    a very long file is rejected without holding all of its samples. `grow(total)` is told, before
    the samples are written, how many the output will hold, a second at a time (a memory budget
    across requests, optim/budget.py); what it raises stops decoding and is raised as it is.
    """
    if not data:
        raise EmptyAudio("the uploaded file is empty")
    try:
        # metadata_errors: a Latin-1 title tag must not make a good file unreadable (we never read tags)
        container = av.open(io.BytesIO(data), mode="r", container_options=_OPEN_OPTIONS, metadata_errors="replace")
    except (av.error.FFmpegError, ValueError, OverflowError, MemoryError) as e:
        raise UnsupportedAudio(f"the file is not a recognised audio format (accepted: {', '.join(FORMATS)})") from e

    with container:
        name = container.format.name
        if not set(name.split(",")) & set(FORMATS):  # a second line, should the whitelist ever be ignored
            raise UnsupportedAudio(f"the {name} format is not accepted (accepted: {', '.join(FORMATS)})")
        if not container.streams.audio:
            raise UnsupportedAudio(f"the file ({name}) has no audio stream")
        stream = container.streams.audio[0]
        if stream.codec_context is None:  # FFmpeg has no decoder for it
            raise UnsupportedAudio(f"the {name} file's audio codec is not one this server decodes")
        rate, channels = stream.codec_context.sample_rate or 0, stream.codec_context.channels or 0
        _check_range(rate or None, channels)  # before a decoder is opened for them
        # The container often knows the duration up front: reject before decoding anything.
        announced = None if container.duration is None else container.duration / av.time_base
        if max_seconds is not None and announced is not None and announced > max_seconds + 1:
            raise AudioTooLong(f"the audio is {announced:.1f} s long; {_maximum(max_seconds)}")
        # Room for what the header announces (if plausible), never past the limit; a header that
        # lies costs growing.
        plausible = announced if announced is not None and 0 < announced < 3 * 3600 else None
        seconds = min((s for s in (plausible, max_seconds) if s is not None), default=60.0)
        try:
            out = _Samples(int(seconds * SAMPLE_RATE) + SAMPLE_RATE, grow)
            _decode(container, stream, max_seconds, out)
        except (av.error.FFmpegError, ValueError, OverflowError, MemoryError) as e:
            raise CorruptAudio(f"the {name} audio could not be decoded (truncated or damaged?): {e}") from e

    samples = out.take()
    if max_seconds is not None and len(samples) > int(max_seconds * SAMPLE_RATE):
        raise AudioTooLong(f"the audio is {len(samples) / SAMPLE_RATE:.1f} s long; {_maximum(max_seconds)}")
    if len(samples) == 0:
        raise EmptyAudio("the file contains no audio samples")
    return Audio(
        samples=np.clip(samples, -1.0, 1.0, out=samples), source_format=name, source_sample_rate=rate, source_channels=channels
    )


def _decode(container: av.container.InputContainer, stream: av.AudioStream, max_seconds: float | None, out: _Samples) -> None:
    limit = None if max_seconds is None else int(max_seconds * SAMPLE_RATE)
    resampler, setup = None, None
    expected = 0.0  # samples at SAMPLE_RATE the frames so far will resample to
    for frame in _frames(container, stream):
        _check_range(frame.sample_rate, frame.layout.nb_channels)
        # Checked on every frame, before resampling it: whatever the header said (a FLAC with no
        # total, hours of silence in a few KB), at most one frame past the limit is ever decoded.
        expected += frame.samples * SAMPLE_RATE / frame.sample_rate
        if limit is not None and expected > limit + 1:
            raise AudioTooLong(f"the audio is longer than {max_seconds:g} s, the maximum (setting MAX_AUDIO_SECONDS)")
        if frame.layout.nb_channels > 2 and not _positions_known(frame.layout):
            frame = _average_channels(frame)
        # A stream may change rate or channels midway (a concatenated ADTS or MP3 capture): a
        # resampler takes one setup only, so flush it and start another.
        if (frame.format.name, frame.layout.name, frame.sample_rate) != setup:
            if resampler is not None:
                out.extend(resampler.resample(None))
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            setup = (frame.format.name, frame.layout.name, frame.sample_rate)
        out.extend(resampler.resample(frame))
    if resampler is not None:
        out.extend(resampler.resample(None))  # its delay line


def _frames(container: av.container.InputContainer, stream: av.AudioStream) -> Iterator[av.AudioFrame]:
    """`container.decode(stream)`, less a PyAV bug: when a stream appears midway (MPEG-TS can add
    one), the flush loop that ends its demuxing reads past its table of streams and may raise
    IndexError. Every packet is read by then and ours, an older stream, already flushed: the end."""
    try:
        yield from container.decode(stream)
    except IndexError:
        return


class _Samples:
    """The decoded samples in one float32 array, in place of a list of chunks and a concatenation.

    Sized up front to the header's duration or the limit; `np.empty` only reserves address space
    and a page becomes resident when a sample is written to it, so even room for the whole limit
    costs what is decoded. Peak memory decoding a 10-minute file (38.4 MB of samples), before
    (chunks + np.concatenate + np.clip's copy) → now: 44.1-kHz stereo FLAC and MP3, RSS +117/+124 MB
    → +39/+41 MB, tracemalloc 117/121 MB → 38.5 MB; a FLAC whose header has no length, limit
    1800 s: RSS +119 → +42 MB (tests/test_audio.py::test_decoding_holds_one_copy); the same with
    no limit, which grows by copying: +94 MB.
    """

    def __init__(self, capacity: int, grow: Callable[[int], None] | None = None):
        self.array = np.empty(capacity, dtype=np.float32)
        self.size = 0
        self.grow, self.granted = grow, 0

    def extend(self, frames: list[av.AudioFrame]) -> None:
        for frame in frames:
            chunk = frame.to_ndarray().reshape(-1)  # flt mono: one packed plane
            if not np.isfinite(chunk).all():  # NaN/±Inf survive np.clip and poison the log-mel
                raise NonFiniteAudio("the audio has NaN or infinite samples (a damaged float file?)")
            end = self.size + len(chunk)
            if self.grow is not None and end > self.granted:  # whole seconds: one call per second of audio
                self.granted = -(-end // SAMPLE_RATE) * SAMPLE_RATE
                self.grow(self.granted)
            if end > len(self.array):  # no room left (no limit, or a header that said less): grow geometrically
                grown = np.empty(max(end, 2 * len(self.array)), dtype=np.float32)
                grown[: self.size] = self.array[: self.size]
                self.array = grown
            self.array[self.size : end] = chunk
            self.size = end

    def take(self) -> np.ndarray:
        self.array.resize(self.size, refcheck=False)  # shrinks in place (realloc): no second copy
        return self.array


def _check_range(rate: int | None, channels: int) -> None:
    """`rate` None: not known before decoding (each frame is checked again)."""
    if rate is not None and rate not in SAMPLE_RATES:
        raise AudioOutOfRange(
            f"the audio's sample rate is {rate} Hz; supported: {SAMPLE_RATES.start} to {SAMPLE_RATES.stop - 1} Hz"
        )
    if channels > MAX_CHANNELS:
        raise AudioOutOfRange(f"the audio has too many channels ({channels}); at most {MAX_CHANNELS}")


def _positions_known(layout: av.AudioLayout) -> bool:
    """Whether FFmpeg knows where each channel's speaker is (5.1, 7.1, ...), and so can downmix it.
    A plain WAV or AIFF past stereo, an ambisonic or a custom layout does not say: FFmpeg guesses a
    standard layout of that many channels, and fails beyond 24."""
    return not any(c.name == "NONE" or c.name.startswith(("AMBI", "USR")) for c in layout.channels)


def _average_channels(frame: av.AudioFrame) -> av.AudioFrame:
    """Mono as the plain mean of the channels: with no speaker positions every channel weighs the same."""
    x = frame.to_ndarray()
    if not frame.format.is_planar:  # one plane of interleaved samples
        x = x.reshape(frame.samples, frame.layout.nb_channels).T
    mono = x.mean(axis=0, dtype=np.float64)
    if x.dtype.kind in "iu":  # integer PCM to [-1, 1): u8 is centred on 128
        info = np.iinfo(x.dtype)
        mono = (mono - (int(info.min) + int(info.max) + 1) / 2) / ((int(info.max) - int(info.min) + 1) / 2)
    out = av.AudioFrame.from_ndarray(mono.astype(np.float32)[None], format="flt", layout="mono")
    out.sample_rate = frame.sample_rate
    return out


def _maximum(max_seconds: float) -> str:
    return f"the maximum is {max_seconds:g} s (setting MAX_AUDIO_SECONDS)"
