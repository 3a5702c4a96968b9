"""Decoding: every claimed format, any rate and channel count, and clear errors for bad input,
hostile input included (inputs that open other inputs, bombs, NaN, absurd headers)."""

from __future__ import annotations

import base64
import io
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import av
import numpy as np
import pytest

from optim import audio as audio_module
from optim.audio import MAX_CHANNELS, SAMPLE_RATE, decode_audio
from optim.errors import (
    AudioError,
    AudioOutOfRange,
    AudioTooLong,
    CorruptAudio,
    EmptyAudio,
    Kind,
    NonFiniteAudio,
    UnsupportedAudio,
)
from optim.memory import release_freed_memory
from tests.audio_formats import FORMATS, encode_audio, pcm_wav

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def speech(clips) -> np.ndarray:
    return decode_audio(clips["jfk"].data).samples


def test_real_files_of_each_shipped_kind(clips):
    decode_audio(clips["jfk"].data)  # a pool a library starts once on first use is not a leak; one per decode would be
    before = _tasks()
    for clip in clips.values():  # flac 44.1 kHz stereo, wav 22.05/16 kHz, mp3 48 kHz, ogg/opus 48 kHz
        audio = decode_audio(clip.data)
        assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
        assert audio.duration == pytest.approx(clip.duration, abs=0.08), clip.id
    jfk = decode_audio(clips["jfk"].data)
    assert (jfk.source_format, jfk.source_sample_rate, jfk.source_channels) == ("flac", 44_100, 2)
    assert _tasks() <= before  # decoding leaves no thread behind


def test_every_accepted_format_is_a_demuxer():
    for name in audio_module.FORMATS:
        assert av.ContainerFormat(name, "r").name == name


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


# ---------------------------------------------------------------- inputs that open other inputs
def _tasks() -> set[str]:
    """The ids of this process's OS threads, Python's and native ones alike. Compared by id, not
    counted: a native thread an earlier test left may end meanwhile (CI: a count went 3 → 2)."""
    return set(os.listdir("/proc/self/task"))


def _hls(entry: str) -> bytes:
    return f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{entry}\n#EXT-X-ENDLIST\n".encode()


def _sdp(port: int) -> bytes:  # an RTP stream FFmpeg would listen for on UDP `port` (and port + 1)
    return f"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=-\nc=IN IP4 127.0.0.1\nt=0 0\nm=audio {port} RTP/AVP 0\na=rtpmap:0 PCMU/8000\n".encode()


_SILENCE = pcm_wav(np.zeros(1600, "<i2"), SAMPLE_RATE)
ATTACKS = {  # name -> upload, given the local TCP and a free UDP port
    "ffconcat-relative": lambda tcp, udp: b"ffconcat version 1.0\nfile tests/data/jfk.flac\n",
    "ffconcat-absolute": lambda tcp, udp: b"ffconcat version 1.0\nfile /etc/passwd\n",
    "ffconcat-data-uri": lambda tcp, udp: (
        b"ffconcat version 1.0\nfile 'data:audio/wav;base64," + base64.b64encode(_SILENCE) + b"'\n"
    ),
    "hls-file-url": lambda tcp, udp: _hls(f"file://{ROOT}/tests/data/jfk.flac"),
    "hls-relative": lambda tcp, udp: _hls("tests/data/jfk.flac"),
    "hls-http": lambda tcp, udp: _hls(f"http://127.0.0.1:{tcp}/segment.ts"),
    "sdp": lambda tcp, udp: _sdp(udp),
}
NESTING = {"ffconcat": "concat", "hls": "hls", "sdp": "sdp"}  # the demuxer each attack needs


@pytest.fixture
def network(monkeypatch) -> Iterator[tuple[socket.socket, int]]:
    """A TCP listener no connection may reach, and a UDP port no socket may bind; run from the
    repository root, where the relative entries would find tests/data/jfk.flac."""
    monkeypatch.chdir(ROOT)
    with socket.create_server(("127.0.0.1", 0)) as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        udp = probe.getsockname()[1]
        probe.close()
        yield tcp, udp


def _connected(tcp: socket.socket) -> bool:
    tcp.settimeout(0.2)
    try:
        tcp.accept()[0].close()
    except TimeoutError:
        return False
    return True


def _bound_udp_ports() -> set[int]:
    ports = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        if os.path.exists(table):
            for line in Path(table).read_text().splitlines()[1:]:
                ports.add(int(line.split()[1].rsplit(":", 1)[1], 16))
    return ports


@contextmanager
def _watch_udp(port: int) -> Iterator[list[int]]:
    """Polls the UDP table while the block runs: the ports of `port`, `port` + 1 seen bound."""
    seen: list[int] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            seen.extend(sorted(_bound_udp_ports() & {port, port + 1}))
            done.wait(0.005)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        yield seen
    finally:
        done.set()
        watcher.join()


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_inputs_that_open_other_inputs_are_refused(network, name):
    tcp, udp = network
    data = ATTACKS[name](tcp.getsockname()[1], udp)
    before = _tasks()
    with _watch_udp(udp) as bound:
        start = time.monotonic()
        # before: ffconcat-relative decoded jfk.flac from this server's disk (11 s of its speech);
        # sdp bound UDP ports and held the thread 20 s for an RTP stream
        with pytest.raises(UnsupportedAudio, match="not a recognised audio format"):
            decode_audio(data)
        elapsed = time.monotonic() - start
    assert elapsed < 1.0
    assert not bound and not _connected(tcp)
    assert _tasks() <= before


def _nested_samples(data: bytes, demuxer: str, options: dict[str, str]) -> int:
    try:
        # the timeout: without the protocol list, FFmpeg would wait forever on a listener that never answers
        with av.open(io.BytesIO(data), format=demuxer, container_options=options, timeout=2.0) as container:
            return sum(frame.samples for frame in container.decode(audio=0)) if container.streams.audio else 0
    except av.error.FFmpegError:
        return 0


@pytest.mark.parametrize("name", ["ffconcat-relative", "hls-file-url", "hls-relative", "hls-http", "sdp"])
def test_protocols_alone_refuse_every_nested_open(network, name):
    """The second lock: even a demuxer that opens other inputs, were it let in, opens none."""
    tcp, udp = network
    data, demuxer = ATTACKS[name](tcp.getsockname()[1], udp), NESTING[name.split("-")[0]]
    if name in ("ffconcat-relative", "hls-file-url", "hls-relative"):  # the attack is real with this FFmpeg
        assert _nested_samples(data, demuxer, {}) > 0
    only_protocols = {k: v for k, v in audio_module._OPEN_OPTIONS.items() if k != "format_whitelist"}
    with _watch_udp(udp) as bound:
        start = time.monotonic()
        assert _nested_samples(data, demuxer, only_protocols) == 0
        elapsed = time.monotonic() - start
    assert elapsed < 1.0
    assert not bound and not _connected(tcp)


# ---------------------------------------------------------------- content and headers
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("rate", [SAMPLE_RATE, 44_100])  # passed through, and resampled
def test_non_finite_samples_are_refused(speech, value, rate):
    floats = speech.astype("<f4")
    floats[len(floats) // 2] = value  # one sample, in an IEEE-float WAV
    with pytest.raises(NonFiniteAudio, match="NaN or infinite") as refused:  # before: decoded, NaN and all
        decode_audio(pcm_wav(floats, rate))
    assert refused.value.kind is Kind.INVALID and refused.value.code == "invalid_audio"


@pytest.mark.parametrize(("channels", "rate"), [(3, 16_000), (6, 16_000), (32, 16_000), (32, 48_000), (MAX_CHANNELS, 22_050)])
def test_channels_without_speaker_positions_are_averaged(speech, channels, rate):
    pcm = np.round(speech * 16384).astype("<i2")  # at half scale resampling never reaches the clip
    mono = decode_audio(pcm_wav(pcm, rate)).samples
    every = np.repeat(pcm, channels)  # interleaved: the speech in every channel
    audio = decode_audio(pcm_wav(every, rate, channels))  # before, from 32 channels: "truncated or damaged?"
    assert audio.source_channels == channels
    np.testing.assert_allclose(audio.samples, mono, atol=1e-5)
    # a plain mean: with only the even channels speaking, the speech comes back at their share
    even = (every.reshape(-1, channels) * (np.arange(channels) % 2 == 0)).astype("<i2").reshape(-1)
    share = len(range(0, channels, 2)) / channels
    np.testing.assert_allclose(decode_audio(pcm_wav(even, rate, channels)).samples, share * mono, atol=1e-4)


def test_too_many_channels_are_refused_clearly():
    channels = MAX_CHANNELS + 1
    with pytest.raises(AudioOutOfRange, match=rf"too many channels \({channels}\); at most {MAX_CHANNELS}"):
        decode_audio(pcm_wav(np.zeros(channels * 1000, "<i2"), SAMPLE_RATE, channels))


@pytest.mark.parametrize("rate", [1, 999, 10_000_000, 2**31 - 1])
def test_absurd_sample_rates_are_refused(rate):
    # before: 1 Hz resampled 16000-fold (4000 samples → 64 M), 2**31 - 1 Hz "Cannot allocate memory"
    with pytest.raises(AudioOutOfRange, match=f"sample rate is {rate} Hz"):
        decode_audio(pcm_wav(np.zeros(4000, "<i2"), rate))


@pytest.mark.parametrize("rate", [1_000, 8_000, 768_000])
def test_every_plausible_sample_rate_decodes(rate):
    assert decode_audio(pcm_wav(np.zeros(32_000, "<i2"), rate)).duration == pytest.approx(32_000 / rate, abs=0.01)


def test_sample_rate_zero_is_not_audio():
    with pytest.raises(UnsupportedAudio):
        decode_audio(pcm_wav(np.zeros(4000, "<i2"), 0))


def test_a_codec_without_a_decoder_is_unsupported():
    wav = bytearray(pcm_wav(np.zeros(4000, "<i2"), SAMPLE_RATE))
    wav[34:36] = struct.pack("<H", 0)  # 0 bits per sample: no PCM decoder for that
    with pytest.raises(UnsupportedAudio, match="codec is not one this server decodes"):  # before: AttributeError
        decode_audio(bytes(wav))


def test_a_video_without_audio():
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        video = out.add_stream("mpeg4", rate=25)
        video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
            frame.pts = i
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
    with pytest.raises(UnsupportedAudio, match="has no audio stream"):
        decode_audio(buffer.getvalue())


@pytest.mark.parametrize("length", [4, 10, 100, 417, 1000, 5000])
def test_a_truncated_mp3_is_an_audio_error(speech, length):
    mp3 = encode_audio(speech, "mp3", "libmp3lame", 44_100)
    try:
        decode_audio(mp3[:length])
    except AudioError:
        pass


def test_a_stream_that_changes_rate_and_channels_midway(speech):
    # two ADTS AAC streams end to end, as a captured radio stream can be
    first = encode_audio(speech, "adts", "aac", 44_100, 1)
    second = encode_audio(speech, "adts", "aac", 22_050, 2)
    audio = decode_audio(first + second)  # before: ValueError("Frame does not match AudioResampler setup.")
    assert audio.duration == pytest.approx(2 * len(speech) / SAMPLE_RATE, abs=0.2)
    for part in (audio.samples, audio.samples[len(speech) :]):  # each up to its own codec delay
        assert max(_envelope_correlation(part[lag:], speech) for lag in range(0, 3200, 160)) > 0.95


def test_a_stream_that_appears_midway(speech):
    ts = bytearray(encode_audio(speech, "mpegts", "mp2", 48_000))
    # one packet that starts a PES moves to PID 0x1100, which no table names: FFmpeg adds a stream
    # while demuxing, and PyAV's end-of-demux flush reads past its own table of streams
    starts = [i for i in range(0, len(ts), 188) if ts[i : i + 2] == b"\x47\x41"]  # PUSI on PID 0x100
    ts[starts[len(starts) // 2] + 1] = 0x51
    audio = decode_audio(bytes(ts))  # before: IndexError("list index out of range")
    assert audio.duration == pytest.approx(len(speech) / SAMPLE_RATE, abs=0.1)


def test_named_layouts_keep_ffmpeg_downmix(speech):
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="ac3") as out:  # 5.1 with the speech in the centre channel only
        stream = out.add_stream("ac3", rate=48_000, layout="5.1")
        planar = np.zeros((6, len(speech)), np.float32)
        planar[2] = speech
        frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout="5.1")
        frame.sample_rate = SAMPLE_RATE
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    audio = decode_audio(buffer.getvalue())
    assert audio.source_channels == 6
    # FFmpeg's downmix keeps the centre (dialogue) at full level; a plain mean would give a sixth
    assert np.sqrt(np.mean(audio.samples**2) / np.mean(speech**2)) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_damaged_files_are_audio_errors(speech, fmt):
    """Seeded mutations of every format (bytes flipped in the header or anywhere, cut short):
    each decodes or raises an AudioError, fast, and never returns a sample outside [-1, 1]."""
    container, codec, rate = FORMATS[fmt]
    good = encode_audio(speech[: 2 * SAMPLE_RATE], container, codec, rate, 2)
    rng = np.random.default_rng(sorted(FORMATS).index(fmt))
    for _ in range(12):
        damaged = bytearray(good)
        for _ in range(int(rng.integers(1, 30))):
            where = min(512, len(damaged)) if rng.random() < 0.5 else len(damaged)  # in the header, or anywhere
            damaged[int(rng.integers(where))] = int(rng.integers(256))
        for data in (bytes(damaged), good[: int(rng.integers(len(good)))]):
            start = time.monotonic()
            try:
                samples = decode_audio(data, max_seconds=30).samples
            except AudioError:
                pass
            else:
                assert np.isfinite(samples).all() and np.abs(samples).max(initial=0) <= 1.0
            assert time.monotonic() - start < 2.0


def test_tags_that_are_not_utf8(speech):
    title = "Café".encode("latin-1") + b"\0\0"  # padded to an even length
    info = b"INFO" + b"INAM" + struct.pack("<I", len(title)) + title
    wav = pcm_wav(np.round(speech * 32767).astype("<i2"), SAMPLE_RATE, chunks=b"LIST" + struct.pack("<I", len(info)) + info)
    assert decode_audio(wav).duration == pytest.approx(len(speech) / SAMPLE_RATE)  # before: 415, UnicodeDecodeError


@pytest.mark.parametrize("error", [ValueError, OverflowError, MemoryError])
def test_other_exceptions_from_pyav_are_audio_errors(monkeypatch, clips, error):
    class Failing:
        def __init__(self, **_):
            pass

        def resample(self, frame):
            raise error("raised inside PyAV")

    monkeypatch.setattr(av, "AudioResampler", Failing)
    with pytest.raises(CorruptAudio, match="raised inside PyAV"):  # before: ValueError and the others escaped
        decode_audio(clips["jfk"].data)

    def failing_open(*args, **kwargs):
        raise error("raised inside PyAV")

    monkeypatch.setattr(av, "open", failing_open)
    with pytest.raises(UnsupportedAudio):
        decode_audio(clips["jfk"].data)


# ---------------------------------------------------------------- bombs
@pytest.fixture(scope="module")
def silence_bomb() -> bytes:
    """Ten minutes of silence as a 115-KB FLAC whose header no longer says how long it is."""
    flac = bytearray(encode_audio(np.zeros(600 * SAMPLE_RATE, np.float32), "flac", "flac"))
    # STREAMINFO follows "fLaC" and its 4-byte block header; its bytes 10-17 pack the sample rate
    # (20 bits), channels (3), bits per sample (5) and, in the low 36 bits, the total sample count
    assert flac[:4] == b"fLaC" and flac[4] & 0x7F == 0
    flac[21] &= 0xF0
    flac[22:26] = bytes(4)
    with av.open(io.BytesIO(bytes(flac))) as container:
        assert container.duration is None  # nothing to reject up front
    return bytes(flac)


def test_a_stream_that_hides_its_length_stops_at_the_limit(silence_bomb):
    start = time.perf_counter()
    assert decode_audio(silence_bomb).duration == pytest.approx(600)
    whole = time.perf_counter() - start
    start = time.perf_counter()
    with pytest.raises(AudioTooLong, match="longer than 30 s, the maximum"):  # before: "is 30.0 s long"
        decode_audio(silence_bomb, max_seconds=30)
    assert time.perf_counter() - start < whole / 4  # 30 s of 600 decoded, give or take a frame


def _peak_rss_growth(decode) -> tuple[np.ndarray, int]:
    """What `decode` returns, and how far it took the process's peak RSS above its RSS before."""
    release_freed_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pytest.skip("cannot reset the peak RSS here")
    before = _status_bytes("VmRSS")
    result = decode()
    return result, _status_bytes("VmHWM") - before


def _status_bytes(key: str) -> int:
    return int(Path("/proc/self/status").read_text().split(key + ":")[1].split()[0]) * 1024


def test_decoding_holds_one_copy(silence_bomb):
    # Before: chunks + their concatenation + np.clip's copy, three copies (here +113 MB for 38 MB);
    # now one array written in place.
    audio, growth = _peak_rss_growth(lambda: decode_audio(silence_bomb, max_seconds=1800))
    assert audio.duration == pytest.approx(600)
    assert growth < 1.5 * audio.samples.nbytes, f"{growth / 1e6:.0f} MB for {audio.samples.nbytes / 1e6:.0f} MB of samples"
    assert audio.samples.flags.owndata and len(audio.samples) == audio.samples.size


def test_grow_is_asked_before_the_samples_are_held(speech, silence_bomb):
    totals: list[int] = []
    audio = decode_audio(encode_audio(speech, "flac", "flac", 44_100), grow=totals.append)
    assert totals == [SAMPLE_RATE * (i + 1) for i in range(len(totals))]  # a second at a time, in order
    assert totals[-1] - SAMPLE_RATE < len(audio.samples) <= totals[-1]

    class BudgetFull(Exception):  # what a budget raises is raised as it is, and stops the decoding
        pass

    def refuse_past_ten_seconds(total: int) -> None:
        if total > 10 * SAMPLE_RATE:
            raise BudgetFull

    start = time.perf_counter()
    with pytest.raises(BudgetFull):
        decode_audio(silence_bomb, grow=refuse_past_ten_seconds)
    assert time.perf_counter() - start < 0.5
