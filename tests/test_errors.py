"""Bad input gets the right status in OpenAI's error shape, and the server keeps serving."""

from __future__ import annotations

import asyncio
import io
import os
import struct
import time

import av
import httpx
import numpy as np
import pytest

from app.main import create_app
from app.settings import Settings
from optim.audio import SAMPLE_RATE, decode_audio
from optim.weights import save_openai_checkpoint
from tests.audio_formats import encode_audio
from tests.conftest import ROOT, Server, english_wer
from tests.test_memory import flac_bomb
from tests.test_api import post


def _assert_error(response: httpx.Response, status: int, code: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if param is not None:
        assert error["param"] == param
    return error


SDP = b"v=0\r\no=- 0 0 IN IP4 0.0.0.0\r\ns=x\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\nm=audio 5004 RTP/AVP 0\r\n"


def _playlist(entry: str) -> bytes:
    return f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10.0,\n{entry}\n#EXT-X-ENDLIST\n".encode()


def _poisoned(samples: np.ndarray, value: float) -> np.ndarray:
    poisoned = samples.copy()
    poisoned[1000::5000] = value
    poisoned[2000::5000] = -value
    return poisoned


def float_wav(samples: np.ndarray) -> bytes:
    """A 16 kHz mono IEEE-float WAV (format tag 3), written by hand: samples pass through as they are."""
    body = np.asarray(samples, dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, SAMPLE_RATE, SAMPLE_RATE * 4, 4, 32)
    return b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(body)) + b"WAVEfmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(body)) + body


def video_without_audio() -> bytes:
    """A real MP4 with one video stream and no audio."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 40, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def speech(clips) -> np.ndarray:
    return decode_audio(clips["lj-LJ001-0001"].data).samples  # 9.7 s


@pytest.fixture(scope="module")
def bad_inputs(clips, speech) -> dict[str, tuple[bytes, str, dict, int, str]]:
    """name -> (file bytes, filename, form fields, expected status, expected code)"""
    flac = clips["jfk"].data
    ten_minutes = np.tile(speech, int(600 / 9.6) + 1)[: 600 * SAMPLE_RATE]
    return {
        "empty": (b"", "empty.wav", {}, 400, "empty_file"),
        "random-bytes": (np.random.default_rng(1).bytes(50_000), "noise.mp3", {}, 415, "unsupported_audio_format"),
        "text-named-wav": (b"Not audio at all, just text.\n" * 40, "notes.wav", {}, 415, "unsupported_audio_format"),
        "truncated-flac": (flac[: len(flac) // 3], "cut.flac", {}, 400, "invalid_audio"),
        "ten-minutes-mp3": (encode_audio(ten_minutes, "mp3", "libmp3lame", SAMPLE_RATE), "long.mp3", {}, 413, "audio_too_long"),
        "301-seconds-wav": (encode_audio(ten_minutes[: 301 * SAMPLE_RATE], "wav", "pcm_s16le"), "long.wav", {}, 413, "audio_too_long"),
        "unknown-model": (flac, "jfk.flac", {"model": "large-v9"}, 404, "model_not_found"),
        "unknown-variant": (flac, "jfk.flac", {"model": "tiny.en:int4"}, 400, "unknown_variant"),
        "conflicting-precisions": (flac, "jfk.flac", {"model": "tiny.en", "variant": "fp16+int8"}, 400, "unknown_variant"),
        "model-and-variant-disagree": (flac, "jfk.flac", {"model": "tiny.en:int8", "variant": "flash"}, 400, "invalid_value"),
        "bad-response-format": (flac, "jfk.flac", {"response_format": "xml"}, 400, "invalid_value"),
        "temperature-too-high": (flac, "jfk.flac", {"temperature": "1.5"}, 400, "invalid_value"),
        "temperature-not-a-number": (flac, "jfk.flac", {"temperature": "warm"}, 400, "invalid_value"),
        "unknown-language": (flac, "jfk.flac", {"language": "klingon"}, 400, "unsupported_option"),
        "english-only-model-in-german": (flac, "jfk.flac", {"model": "tiny.en", "language": "de"}, 400, "unsupported_option"),
        "words-without-verbose-json": (flac, "jfk.flac", {"timestamp_granularities[]": "word"}, 400, "invalid_value"),
        "bad-granularity": (flac, "jfk.flac", {"timestamp_granularities[]": "phoneme"}, 400, "invalid_value"),
        # container formats that open other inputs: never followed (files on the server, sockets)
        "ffconcat-relative-path": (b"ffconcat version 1.0\nfile tests/data/jfk.flac\n", "list.txt", {}, 415, "unsupported_audio_format"),
        "ffconcat-absolute-path": (b"ffconcat version 1.0\nfile /etc/passwd\n", "list.wav", {}, 415, "unsupported_audio_format"),
        "ffconcat-data-uri": (b"ffconcat version 1.0\nfile 'data:audio/flac;base64,ZkxhQw=='\n", "a.wav", {}, 415, "unsupported_audio_format"),
        "hls-file-url": (_playlist(f"file://{ROOT}/tests/data/jfk.flac"), "a.m3u8", {}, 415, "unsupported_audio_format"),
        "hls-http-url": (_playlist("http://127.0.0.1:9/segment.ts"), "a.m3u8", {}, 415, "unsupported_audio_format"),
        "hls-relative-path": (_playlist("tests/data/jfk.flac"), "a.wav", {}, 415, "unsupported_audio_format"),
        "sdp-udp-listener": (SDP, "a.sdp", {}, 415, "unsupported_audio_format"),
        # samples no model can use, and a decompression bomb: an hour of FLAC silence in a few KB, length erased
        "nan-samples": (float_wav(_poisoned(speech, np.nan)), "nan.wav", {}, 400, "invalid_audio"),
        "inf-samples": (float_wav(_poisoned(speech, np.inf)), "inf.wav", {}, 400, "invalid_audio"),
        "flac-bomb": (flac_bomb(3600), "bomb.flac", {}, 413, "audio_too_long"),
        "video-without-audio": (video_without_audio(), "silent.mp4", {}, 415, "unsupported_audio_format"),
        # fields: over-long, hostile, out of range
        "prompt-too-long": (flac, "jfk.flac", {"prompt": "spam " * 2000}, 400, "prompt_too_long"),
        "model-path-traversal": (flac, "jfk.flac", {"model": "../../../etc/passwd"}, 404, "model_not_found"),
        "model-checkpoint-path": (flac, "jfk.flac", {"model": f"{ROOT}/tests/data/jfk.flac"}, 404, "model_not_found"),
        "temperature-nan": (flac, "jfk.flac", {"temperature": "nan"}, 400, "invalid_value"),
        "huge-language-field": (flac, "jfk.flac", {"language": "x" * 500_000}, 400, "unsupported_option"),
        "reference-without-words": (flac, "jfk.flac", {"reference": " ... "}, 400, "invalid_value"),
    }


BAD_INPUTS = [
    "empty", "random-bytes", "text-named-wav", "truncated-flac", "ten-minutes-mp3", "301-seconds-wav", "unknown-model",
    "unknown-variant", "conflicting-precisions", "model-and-variant-disagree",
    "bad-response-format", "temperature-too-high", "temperature-not-a-number", "unknown-language",
    "english-only-model-in-german", "words-without-verbose-json", "bad-granularity",
    "ffconcat-relative-path", "ffconcat-absolute-path", "ffconcat-data-uri", "hls-file-url", "hls-http-url",
    "hls-relative-path", "sdp-udp-listener", "nan-samples", "inf-samples", "flac-bomb", "video-without-audio",
    "prompt-too-long", "model-path-traversal", "model-checkpoint-path", "temperature-nan", "huge-language-field",
    "reference-without-words",
]  # fmt: skip
ANSWER_WITHIN_S = 15  # every bad input is answered this fast (on 2 busy cores); an SDP upload used to take 20 s


def _open_sockets(pid: int) -> int:
    return sum(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:") for fd in os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_then_a_good_request(server, http, clips, bad_inputs, name):
    """The corpus: each bad input gets its documented status and code, in OpenAI's shape, fast;
    the server opens no socket and starts no thread for it; and the next request gets its words."""
    data, filename, form, status, code = bad_inputs[name]
    pid = server.process.pid
    assert http.get("/health").status_code == 200  # the client's keep-alive connection is open before counting
    sockets, threads = _open_sockets(pid), len(os.listdir(f"/proc/{pid}/task"))
    start = time.monotonic()
    response = post(http, data, filename, **{"model": "tiny.en", **form})
    assert time.monotonic() - start < ANSWER_WITHIN_S
    error = _assert_error(response, status, code)
    assert _open_sockets(pid) <= sockets and len(os.listdir(f"/proc/{pid}/task")) <= threads + 2  # (a worker may start)
    if name == "unknown-model":  # names what can be asked for
        assert "tiny.en" in error["message"] and "base" in error["message"]
    if name == "unknown-variant":  # lists the valid variants
        assert "int8+flash" in error["message"] and "winograd" in error["message"]
    ok = post(http, clips["jfk"].data, "jfk.flac", model="tiny.en")
    assert ok.status_code == 200 and english_wer([clips["jfk"].text], [ok.json()["text"]]) <= 0.05


def test_missing_file_field(http):
    _assert_error(http.post("/v1/audio/transcriptions", data={"model": "tiny.en"}), 400, "invalid_value", "file")


def _multipart(*parts: str, boundary: str = "b0undary") -> bytes:
    return "".join(f"--{boundary}\r\n{part}\r\n" for part in parts).encode() + f"--{boundary}--\r\n".encode()


FILE_PART = 'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF'
MALFORMED_MULTIPART: dict[str, tuple[str, bytes]] = {  # name -> (content type, body)
    "no-boundary": ("multipart/form-data", _multipart(FILE_PART)),
    "empty-boundary": ('multipart/form-data; boundary=""', _multipart(FILE_PART)),
    "another-boundary": ("multipart/form-data; boundary=other", b"--b0undary\r\nno headers at all\r\n--b0undary--\r\n"),
    "bad-part-header": ("multipart/form-data; boundary=b0undary", _multipart("not a header line\r\n\r\nabc")),
    "part-without-a-name": ("multipart/form-data; boundary=b0undary", _multipart("Content-Disposition: form-data\r\n\r\nabc")),
    "too-many-fields": (
        "multipart/form-data; boundary=b0undary",
        _multipart(FILE_PART, *(f'Content-Disposition: form-data; name="f{i}"\r\n\r\nv' for i in range(1001))),
    ),
    "too-many-files": (
        "multipart/form-data; boundary=b0undary",
        _multipart(*(f'Content-Disposition: form-data; name="file"; filename="{i}.wav"\r\n\r\nv' for i in range(1001))),
    ),
    "field-over-1-mib": (
        "multipart/form-data; boundary=b0undary",
        _multipart(FILE_PART, 'Content-Disposition: form-data; name="prompt"\r\n\r\n' + "a" * (1024 * 1024 + 1)),
    ),
}


@pytest.mark.parametrize("name", list(MALFORMED_MULTIPART))
def test_malformed_multipart_has_a_code(http, clips, name):
    """Starlette's own parse errors are answered in OpenAI's shape with a code, never `code: null`."""
    content_type, body = MALFORMED_MULTIPART[name]
    response = http.post("/v1/audio/transcriptions", content=body, headers={"content-type": content_type})
    _assert_error(response, 400, "invalid_multipart")
    assert post(http, clips["jfk"].data, "jfk.flac", model="tiny.en").status_code == 200


def test_translation_needs_a_multilingual_model(http, clips):
    response = post(http, clips["pv-de"].data, "de.wav", endpoint="translations", model="tiny.en")
    _assert_error(response, 400, "unsupported_option", "model")


def test_short_silence_is_an_empty_transcript(http):
    silence = encode_audio(np.zeros(1_600, dtype=np.float32), "wav", "pcm_s16le")  # 0.1 s
    for model in ("tiny.en", "base"):
        body = post(http, silence, "silence.wav", model=model, response_format="verbose_json").json()
        assert body["text"] == "" and body["segments"] == [] and body["duration"] == pytest.approx(0.1)


def test_upload_over_the_size_limit(http, clips):
    big = np.random.default_rng(2).bytes(26 * 1024 * 1024)  # default limit 25 MiB
    _assert_error(post(http, big, "big.wav", model="tiny.en"), 413, "file_too_large", "file")

    # a chunked upload declares no Content-Length: it is counted as it arrives and cut off
    boundary = "limit-test-boundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n\r\n'.encode()

    def chunks():
        yield head
        for start in range(0, len(big), 1 << 20):
            yield big[start : start + (1 << 20)]
        yield f"\r\n--{boundary}--\r\n".encode()

    response = http.post(
        "/v1/audio/transcriptions", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    _assert_error(response, 413, "file_too_large")
    assert post(http, clips["jfk"].data, "jfk.flac", model="tiny.en").status_code == 200


def test_unknown_route_is_an_openai_error(http):
    _assert_error(http.get("/v1/nothing-here"), 404, "not_found")


def test_ready_is_503_until_models_are_loaded(tmp_path):
    """In process (ASGI transport, no lifespan): nothing loaded → 503 everywhere a model is needed."""
    app = create_app(Settings(models=["tiny.en"], default_model="tiny.en", models_dir=tmp_path))

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/health")).status_code == 200
            not_ready = await client.get("/ready")
            assert not_ready.status_code == 503 and not_ready.json()["models"] == {"tiny.en": "loading"}
            busy = await client.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"x")})
            assert busy.headers["retry-after"] == "5"
            _assert_error(busy, 503, "model_not_ready", "model")
            await asyncio.to_thread(app.state.service.models.load_startup)
            assert (await client.get("/ready")).status_code == 200

    asyncio.run(scenario())


def test_models_dir_serves_a_user_checkpoint(tiny_model, clips, tmp_path):
    """A standard openai-whisper .pt dropped in MODELS_DIR is listed and loaded on first use."""
    save_openai_checkpoint(tiny_model, tmp_path / "my-tiny.pt")
    server = Server(MODELS="tiny.en", DEFAULT_MODEL="tiny.en", MODELS_DIR=str(tmp_path)).wait_ready()
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            assert {"tiny.en", "my-tiny", "my-tiny:int8", "whisper-1"} <= {m["id"] for m in http.get("/v1/models").json()["data"]}
            body = post(http, clips["jfk"].data, "jfk.flac", model="my-tiny").json()
            assert english_wer([clips["jfk"].text], [body["text"]]) <= 0.05
    finally:
        server.stop()


@pytest.mark.parametrize("prompt", ["<|endoftext|>", "<|startoftranscript|><|de|><|translate|>", "<|0.00|> hi <|notimestamps|>"])
def test_special_tokens_in_a_prompt_are_plain_text(http, clips, prompt):
    """A prompt is text: a special token's spelling in it neither fails the request (it used to be a
    500) nor ends the window or switches its task."""
    jfk = clips["jfk"]
    response = post(http, jfk.data, "jfk.flac", model="tiny.en", prompt=prompt)
    assert response.status_code == 200, response.text
    assert english_wer([jfk.text], [response.json()["text"]]) <= 0.1


def test_a_long_prompt_keeps_its_last_223_tokens(server):
    from app.settings import Settings
    from optim.engine import WhisperEngine
    from optim.types import TranscriptionOptions

    engine = WhisperEngine({"tiny.en": "tiny.en"})
    try:
        engine.models.load("tiny.en")
        ref = engine.models.ref("tiny.en")
        limit = Settings().max_prompt_chars
        tokens = engine.prompt_tokens(ref, TranscriptionOptions(prompt="one two three " * (limit // 14)))
        assert len(tokens) == 223
        tail = engine.tokenizer(ref, "transcribe").decode(tokens)
        assert tail.endswith("one two three") and "<|" not in tail
    finally:
        engine.close()


def test_non_utf8_and_oversized_fields_are_400(http, clips):
    jfk = clips["jfk"].data
    boundary = "b0undary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="jfk.flac"\r\n\r\n'.encode() + jfk + b"\r\n",
        f'--{boundary}\r\nContent-Disposition: form-data; name="language"\r\n\r\n'.encode() + b"\xff\xfe\xfa" + b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ]
    response = http.post(
        "/v1/audio/transcriptions", content=b"".join(parts), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status_code == 400 and response.json()["error"]["code"], response.text
    # a form field over Starlette's 1 MiB part limit, and more fields than it accepts
    big = post(http, jfk, "jfk.flac", model="tiny.en", prompt="x" * (2 * 2**20))
    assert big.status_code in (400, 413) and big.json()["error"]["code"], big.text
    many = http.post("/v1/audio/transcriptions", files={"file": ("jfk.flac", jfk)}, data={f"f{i}": "x" for i in range(1500)})
    assert many.status_code == 400 and many.json()["error"]["code"], many.text


def test_huge_headers_are_refused_in_openai_shape(server, clips):
    import socket

    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(10)
        sock.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") or head.startswith(b"HTTP/1.1 431"), head
    assert b'"code"' in body and b"invalid_request_error" in body, body


def test_variant_builds_are_bounded(clips, tmp_path):
    """Cycling variants to make the server build (and evict) one after another is a cheap DoS:
    only ON_DEMAND_VARIANTS are built on request (others 400), and at most
    VARIANT_BUILDS_PER_MINUTE distinct ones per model (then 429 with Retry-After). Built ones
    keep serving."""
    jfk = clips["jfk"]
    env = dict(MODELS="tiny.en", DEFAULT_MODEL="tiny.en", MODELS_DIR=str(tmp_path), ON_DEMAND_VARIANTS="flash,int8,fp32,winograd",
               VARIANT_BUILDS_PER_MINUTE="2")  # fmt: skip
    with Server(**env) as srv, httpx.Client(base_url=srv.url, timeout=120) as client:
        ok = [post(client, jfk.data, "jfk.flac", model=f"tiny.en:{v}") for v in ("flash", "int8")]
        assert [r.status_code for r in ok] == [200, 200]
        limited = post(client, jfk.data, "jfk.flac", model="tiny.en:fp32")
        error = _assert_error(limited, 429, "variant_build_rate_limited", "model")
        assert 1 <= int(limited.headers["Retry-After"]) <= 60 and "VARIANT_BUILDS_PER_MINUTE" in error["message"]
        refused = post(client, jfk.data, "jfk.flac", model="tiny.en:int8+winograd")
        _assert_error(refused, 400, "variant_not_on_demand", "model")
        # the default and the variants already built still serve, with their words
        for name in ("tiny.en", "tiny.en:flash", "tiny.en:int8"):
            again = post(client, jfk.data, "jfk.flac", model=name)
            assert again.status_code == 200 and english_wer([jfk.text], [again.json()["text"]]) <= 0.05
