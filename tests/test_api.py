"""End to end over real HTTP: `python -m app` on a loopback port, real speech, the official
`openai` SDK and plain multipart requests; assertions on the words, formats and timestamps."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from optim.audio import SAMPLE_RATE, decode_audio
from tests.audio_formats import FORMATS, encode_audio
from tests.conftest import ENGLISH_READ, english_wer

TIMESTAMP = r"(\d\d):(\d\d):(\d\d)[,.](\d\d\d)"


def _seconds(h: str, m: str, s: str, ms: str) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def post(http: httpx.Client, data: bytes, filename: str = "audio.wav", endpoint: str = "transcriptions", **form) -> httpx.Response:
    return http.post(f"/v1/audio/{endpoint}", files={"file": (filename, data)}, data=form)


@pytest.fixture(scope="module")
def long_speech(clips) -> tuple[bytes, str, float]:
    """Five LJ Speech sentences (and JFK) joined: 45 s, over one 30-s window."""
    parts = [clips[f"lj-LJ001-000{i}"] for i in range(1, 6)] + [clips["jfk"]]
    samples = np.concatenate([decode_audio(c.data).samples for c in parts])
    return encode_audio(samples, "flac", "flac"), " ".join(c.text for c in parts), len(samples) / SAMPLE_RATE


# ------------------------------------------------------------------------------ the SDK


@pytest.mark.parametrize("model", ["tiny.en", "base"])
def test_openai_sdk_transcribes_read_english(openai_client, model):
    hypotheses = []
    for clip in ENGLISH_READ:
        with open(clip.path, "rb") as f:
            hypotheses.append(openai_client.audio.transcriptions.create(model=model, file=f).text)
    # measured 2.6 % (tiny.en) and 3.4 % (base) on these 45 s; 8 % still fails a broken model
    assert english_wer([c.text for c in ENGLISH_READ], hypotheses) <= 0.08


def test_whisper_1_is_the_default_model(openai_client, clips):
    with open(clips["jfk"].path, "rb") as f:
        result = openai_client.audio.transcriptions.create(model="whisper-1", file=f, response_format="verbose_json")
    assert english_wer([clips["jfk"].text], [result.text]) <= 0.05
    assert result.language == "english" and result.duration == pytest.approx(11.0, abs=0.01)


def test_openai_sdk_word_timestamps(openai_client, clips):
    clip = clips["jfk"]
    with open(clip.path, "rb") as f:
        result = openai_client.audio.transcriptions.create(
            model="tiny.en", file=f, response_format="verbose_json", timestamp_granularities=["word", "segment"]
        )
    words = result.words
    assert english_wer([clip.text], [" ".join(w.word for w in words)]) <= 0.05
    starts = [w.start for w in words]
    assert starts == sorted(starts)
    assert all(0 <= w.start <= w.end <= clip.duration for w in words)
    # real alignment, not spread evenly: "ask not" follows the pause after "Americans" (~2.1 s)
    americans = next(w for w in words if "Americans" in w.word)
    assert 1.0 < americans.end < 3.0
    assert words[-1].end > 9.0


def test_openai_sdk_translation(openai_client, clips):
    with open(clips["pv-de"].path, "rb") as f:
        result = openai_client.audio.translations.create(model="base", file=f, response_format="verbose_json")
    assert result.language == "english"
    words = set(re.findall(r"[a-zäöüß]+", result.text.lower()))
    assert len(words) >= 3
    # whatever base makes of it (it samples at higher temperatures here), it is not the German text
    assert not words & {"der", "hinter", "diesem", "liegenden", "wurde", "als", "leichenhalle", "genutzt"}


# ------------------------------------------------------------------------------ formats


def test_response_formats(http, clips):
    clip = clips["jfk"]
    json_body = post(http, clip.data, "jfk.flac", model="tiny.en").json()
    assert english_wer([clip.text], [json_body["text"]]) <= 0.05
    assert json_body["usage"] == {"type": "duration", "seconds": 11.0}

    text = post(http, clip.data, "jfk.flac", model="tiny.en", response_format="text")
    assert text.headers["content-type"].startswith("text/plain")
    assert text.text.strip() == json_body["text"]

    srt = post(http, clip.data, "jfk.flac", model="tiny.en", response_format="srt").text
    cues = re.findall(rf"(\d+)\n{TIMESTAMP} --> {TIMESTAMP}\n(.+?)\n", srt)
    assert cues and [int(c[0]) for c in cues] == list(range(1, len(cues) + 1))
    _check_cues([(_seconds(*c[1:5]), _seconds(*c[5:9]), c[9]) for c in cues], clip)

    vtt = post(http, clip.data, "jfk.flac", model="tiny.en", response_format="vtt")
    assert vtt.headers["content-type"].startswith("text/vtt")
    assert vtt.text.startswith("WEBVTT\n")
    cues = re.findall(r"(\d\d):(\d\d)\.(\d\d\d) --> (\d\d):(\d\d)\.(\d\d\d)\n(.+?)\n", vtt.text)
    _check_cues([(_seconds("0", *c[0:3]), _seconds("0", *c[3:6]), c[6]) for c in cues], clip)

    verbose = post(http, clip.data, "jfk.flac", model="tiny.en", response_format="verbose_json").json()
    assert {"task", "language", "duration", "text", "segments"} <= verbose.keys()
    assert "words" not in verbose
    for segment in verbose["segments"]:
        assert set(segment) == {
            "id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob", "compression_ratio", "no_speech_prob",
        }  # fmt: skip
        assert segment["tokens"] and 0 <= segment["no_speech_prob"] <= 1


def _check_cues(cues: list[tuple[float, float, str]], clip) -> None:
    assert english_wer([clip.text], [" ".join(text for _, _, text in cues)]) <= 0.05
    for (start, end, _), (next_start, _, _) in zip(cues, cues[1:] + [(clip.duration, 0, "")]):
        assert 0 <= start <= end <= next_start <= clip.duration


def test_audio_longer_than_30_seconds(http, long_speech):
    data, reference, duration = long_speech
    body = post(http, data, "long.flac", model="tiny.en", response_format="verbose_json").json()
    assert english_wer([reference], [body["text"]]) <= 0.08
    segments = body["segments"]
    assert body["duration"] == pytest.approx(duration, abs=0.01)
    assert all(a["end"] <= b["start"] + 1e-6 for a, b in zip(segments, segments[1:]))
    assert all(0 <= s["start"] <= s["end"] <= duration for s in segments)
    assert segments[-1]["end"] > 40  # the second window was transcribed, with offset timestamps
    assert "ask what you can do for your country" in body["text"].lower()


@pytest.mark.parametrize("clip_id,language", [("pv-de", "german"), ("mls-es-13697_11991_000000", "spanish")])
def test_language_is_detected(http, clips, clip_id, language):
    body = post(http, clips[clip_id].data, clips[clip_id].path.name, model="base", response_format="verbose_json").json()
    assert body["language"] == language


def test_every_format_over_http(http, clips):
    speech = decode_audio(clips["lj-LJ001-0004"].data).samples
    for name, (container, codec, rate) in FORMATS.items():
        response = post(http, encode_audio(speech, container, codec, rate, channels=2), f"clip.{name}", model="tiny.en")
        assert response.status_code == 200, (name, response.text)
        assert english_wer([clips["lj-LJ001-0004"].text], [response.json()["text"]]) <= 0.1, name


# ------------------------------------------------------------------------------ concurrency


def test_concurrent_requests_get_their_own_transcripts(http, clips):
    chosen = [clips[i] for i in ("jfk", "lj-LJ001-0001", "lj-LJ001-0003", "lj-LJ001-0004", "lj-LJ001-0005")]
    with ThreadPoolExecutor(len(chosen)) as pool:
        futures = [pool.submit(post, http, c.data, c.path.name, model="tiny.en") for c in chosen * 2]
        texts = [f.result().json()["text"] for f in futures]
    for clip, text in zip(chosen * 2, texts):
        assert english_wer([clip.text], [text]) <= 0.15, (clip.id, text)


def test_health_answers_during_a_long_transcription(server, long_speech):
    data = long_speech[0]
    done = threading.Event()

    def transcribe_long() -> None:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            for _ in range(2):  # base, twice over 45 s: several seconds of busy worker thread
                assert post(client, data, "long.flac", model="base").status_code == 200
        done.set()

    worker = threading.Thread(target=transcribe_long)
    worker.start()
    latencies = []
    with httpx.Client(base_url=server.url, timeout=10) as client:
        time.sleep(0.5)
        while not done.is_set():
            start = time.perf_counter()
            assert client.get("/health").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.05)
    worker.join()
    assert len(latencies) >= 20
    assert np.percentile(latencies, 90) < 0.1, latencies
    assert max(latencies) < 1.0, latencies


# ------------------------------------------------------------------------------ models


def test_models_list(http):
    body = http.get("/v1/models").json()
    assert body["object"] == "list"
    assert {"tiny.en", "base", "whisper-1"} <= {m["id"] for m in body["data"]}
    assert http.get("/v1/models/base").json()["id"] == "base"
    assert http.get("/v1/models/large").status_code == 404


def test_health_and_ready(http):
    assert http.get("/health").json() == {"status": "ok"}
    ready = http.get("/ready")
    assert ready.status_code == 200 and ready.json()["models"] == {"tiny.en": "loaded", "base": "loaded"}


# ------------------------------------------------------------------------------ variants


def test_variant_per_request(openai_client, http, clips):
    clip = clips["jfk"]
    with open(clip.path, "rb") as f:
        text = openai_client.audio.transcriptions.create(model="base:int8+flash", file=f).text
    assert english_wer([clip.text], [text]) <= 0.05
    by_field = post(http, clip.data, "jfk.flac", model="tiny.en", variant="flash+int8")
    assert by_field.status_code == 200 and by_field.headers["x-model"] == "tiny.en:int8+flash"
    assert english_wer([clip.text], [by_field.json()["text"]]) <= 0.05
    default = post(http, clip.data, "jfk.flac", model="tiny.en")
    assert default.headers["x-model"] == "tiny.en:int8+flash"  # DEFAULT_VARIANT=auto on CPU


def test_models_list_every_served_variant(http):
    ids = {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert {"base:fp32", "base:int8", "base:int8+flash", "tiny.en:winograd+flash", "tiny.en:fp16"} <= ids
    assert "base:fp16+int8" not in ids
