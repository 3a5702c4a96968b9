"""Bad input gets the right status in OpenAI's error shape, and the server keeps serving."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from app.main import create_app
from app.settings import Settings
from optim.audio import SAMPLE_RATE, decode_audio
from optim.weights import save_openai_checkpoint
from tests.audio_formats import encode_audio
from tests.conftest import Server, english_wer
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
    }


BAD_INPUTS = [
    "empty", "random-bytes", "text-named-wav", "truncated-flac", "ten-minutes-mp3", "301-seconds-wav", "unknown-model",
    "unknown-variant", "conflicting-precisions", "model-and-variant-disagree",
    "bad-response-format", "temperature-too-high", "temperature-not-a-number", "unknown-language",
    "english-only-model-in-german", "words-without-verbose-json", "bad-granularity",
]  # fmt: skip


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_then_a_good_request(http, clips, bad_inputs, name):
    data, filename, form, status, code = bad_inputs[name]
    error = _assert_error(post(http, data, filename, **{"model": "tiny.en", **form}), status, code)
    if name == "unknown-model":  # names what can be asked for
        assert "tiny.en" in error["message"] and "base" in error["message"]
    if name == "unknown-variant":  # lists the valid variants
        assert "int8+flash" in error["message"] and "winograd" in error["message"]
    ok = post(http, clips["jfk"].data, "jfk.flac", model="tiny.en")
    assert ok.status_code == 200 and english_wer([clips["jfk"].text], [ok.json()["text"]]) <= 0.05


def test_missing_file_field(http):
    _assert_error(http.post("/v1/audio/transcriptions", data={"model": "tiny.en"}), 400, "invalid_value", "file")


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
