"""GET /metrics after known requests, per-request figures (verbose_json `metrics`, X- headers), and
WER/CER against a reference: on a server of its own, so counts are this module's alone."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from optim.accuracy import score
from tests.conftest import Server

JFK_REFERENCE = "And so my fellow Americans, ask not what your country can do for you; ask what you can do for your country."
# Two known errors against what the model hears: "fellow" heard where the reference says "yellow"
# (a substitution) and "so", which the reference leaves out (an insertion), over 21 reference words.
JFK_TWO_ERRORS = "And my yellow Americans, ask not what your country can do for you; ask what you can do for your country."


@pytest.fixture(scope="module")
def metrics_server():
    with Server(MODELS="tiny.en", DEFAULT_MODEL="tiny.en", PRELOAD_VARIANTS="tiny.en:flash,tiny.en:int8") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(metrics_server):
    with httpx.Client(base_url=metrics_server.url, timeout=300) as c:
        yield c


Samples = dict[tuple[str, frozenset], float]


def parse(exposition: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


def scrape(client: httpx.Client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def post(client: httpx.Client, clip, **fields: str) -> httpx.Response:
    return client.post("/v1/audio/transcriptions", files={"file": (clip.path.name, clip.data)}, data=fields)


def test_counts_audio_seconds_and_buckets_follow_known_requests(client, clips):
    jfk = clips["jfk"]
    before = scrape(client)
    ok = [post(client, jfk, model="tiny.en:flash", response_format="verbose_json") for _ in range(2)]
    ok.append(post(client, jfk, model="tiny.en:int8", response_format="verbose_json"))
    unknown_model = post(client, jfk, model="no-such-model")
    bad_temperature = post(client, jfk, temperature="5")  # refused by validation, before any model is named
    not_audio = client.post("/v1/audio/transcriptions", files={"file": ("x.wav", b"not audio" * 100)}, data={"model": "tiny.en"})
    after = scrape(client)

    assert [r.status_code for r in ok] == [200, 200, 200]
    assert (unknown_model.status_code, bad_temperature.status_code, not_audio.status_code) == (404, 400, 415)
    requests = {
        ("tiny.en", "flash", "2xx"): 2,
        ("tiny.en", "int8", "2xx"): 1,
        ("none", "none", "4xx"): 2,  # unknown model and bad temperature: no model was resolved
        ("tiny.en", "int8+flash", "4xx"): 1,  # the model was known (its default variant), the upload was not audio
        ("tiny.en", "flash", "5xx"): 0,
    }
    for (model, variant, status), count in requests.items():
        labels = dict(model=model, variant=variant, endpoint="transcriptions", status=status)
        assert delta(before, after, "whisper_requests_total", **labels) == count, labels

    flash = dict(model="tiny.en", variant="flash")
    assert delta(before, after, "whisper_audio_seconds_total", **flash) == pytest.approx(2 * jfk.duration)
    assert delta(before, after, "whisper_audio_seconds_total", model="tiny.en", variant="int8") == pytest.approx(jfk.duration)
    assert delta(before, after, "whisper_request_duration_seconds_count", endpoint="transcriptions", **flash) == 2
    assert delta(before, after, "whisper_audio_decode_seconds_count") == 4  # three clips and the bytes that were not audio
    assert delta(before, after, "whisper_batch_size_count", **flash) == 2  # one window each, one after the other
    assert delta(before, after, "whisper_batch_padding_ratio_count", stage="decoder", **flash) == 2

    # Each histogram bucket moved by the number of requests whose figure is at or below its bound.
    figures = [r.json()["metrics"] for r in ok[:2]]
    for metric, key in (("whisper_rtfx", "rtfx"), ("whisper_request_compute_seconds", "compute_seconds")):
        bounds = sorted({float(dict(k[1])["le"]) for k in after if k[0] == f"{metric}_bucket" and dict(k[1]).get("model") == "tiny.en"})
        assert bounds[-1] == float("inf")
        for bound in bounds:
            if any(abs(f[key] - bound) < 0.01 for f in figures):
                continue  # rounded in the response: too close to the bound to tell
            moved = delta(before, after, f"{metric}_bucket", le=_le(bound), **flash)
            assert moved == sum(f[key] <= bound for f in figures), (metric, bound)
        assert delta(before, after, f"{metric}_sum", **flash) == pytest.approx(sum(f[key] for f in figures), abs=0.02)

    # The total the middleware times includes everything the response's own total covers.
    assert delta(before, after, "whisper_request_duration_seconds_sum", endpoint="transcriptions", **flash) >= sum(
        f["total_seconds"] for f in figures
    )


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else str(bound)


def test_live_gauges_memory_and_weights(client, clips):
    after = scrape(client)
    assert value(after, "whisper_requests_in_flight", model="tiny.en", variant="flash") == 0
    assert value(after, "whisper_queue_requests") == 0
    assert ("whisper_queue_windows", frozenset({"model": "tiny.en"}.items())) in after
    rss = value(after, "process_resident_memory_bytes")
    assert 100 * 2**20 < rss <= value(after, "whisper_process_peak_resident_memory_bytes")
    flash = value(after, "whisper_model_weight_bytes", model="tiny.en", variant="flash")
    int8 = value(after, "whisper_model_weight_bytes", model="tiny.en", variant="int8")
    assert 100e6 < flash < 200e6  # 37.8 M float32 parameters, and the mel filters and masks
    assert int8 < 0.6 * flash  # int8 linear weights: a quarter of the bytes; embeddings and convs stay float32
    assert not any(name.startswith("whisper_cuda_") for name, _ in after)  # no CUDA here: no CUDA series


def test_the_dashboard_knows_every_exported_metric(client):
    """tests/test_deploy.py checks the dashboard against its table of metrics; this keeps that table
    equal to what a running server exports (all but CUDA's, which need CUDA), types and labels included."""
    from tests.test_deploy import METRICS

    exported = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name.startswith("whisper_") or family.name in ("process_resident_memory_bytes", "process_cpu_seconds"):
            name = family.name + ("_total" if family.type == "counter" else "")
            labels = {k for s in family.samples for k in s.labels if k != "le"}
            exported[name] = (family.type, labels)
    expected = {k: v for k, v in METRICS.items() if not k.startswith("whisper_cuda_")}
    assert exported.keys() == expected.keys()
    for name, (kind, labels) in exported.items():
        # a labelled metric nobody has observed yet has no samples, so no labels to compare
        assert kind == expected[name][0] and labels in (expected[name][1], set()), name


def test_in_flight_and_admitted_requests_while_one_runs(client, clips, metrics_server):
    long_clip = clips["mfa-michaelandsickmichael"]  # 52 s: two windows, a few seconds on tiny.en
    result: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: result.append(post(client, long_clip, model="tiny.en:flash")))
    worker.start()
    seen_in_flight = seen_admitted = 0.0
    with httpx.Client(base_url=metrics_server.url, timeout=30) as watcher:
        while worker.is_alive():
            now = scrape(watcher)
            seen_in_flight = max(seen_in_flight, value(now, "whisper_requests_in_flight", model="tiny.en", variant="flash"))
            seen_admitted = max(seen_admitted, value(now, "whisper_queue_requests"))
            time.sleep(0.05)
    worker.join()
    assert result[0].status_code == 200
    assert seen_in_flight == 1 and seen_admitted == 1
    assert value(scrape(client), "whisper_requests_in_flight", model="tiny.en", variant="flash") == 0


def test_reference_reports_wer_and_cer_and_feeds_the_metrics(client, clips):
    jfk = clips["jfk"]
    before = scrape(client)
    exact = post(client, jfk, model="tiny.en:flash", response_format="verbose_json", reference=JFK_REFERENCE)
    two_errors = post(client, jfk, model="tiny.en:flash", response_format="text", reference=JFK_TWO_ERRORS)
    after = scrape(client)

    assert exact.status_code == 200 and two_errors.status_code == 200
    assert exact.json()["metrics"]["wer"] == 0.0 and exact.json()["metrics"]["cer"] == 0.0
    assert float(two_errors.headers["X-WER"]) == pytest.approx(2 / 21, abs=1e-4)
    # CER: "fellow" for "yellow" is one character, "so " three inserted ones, over the normalized
    # reference's 101 characters ("and my yellow americans ask ... your country", spaces included)
    assert float(two_errors.headers["X-CER"]) == pytest.approx(4 / 101, abs=1e-4)

    flash = dict(model="tiny.en", variant="flash")
    assert delta(before, after, "whisper_wer_count", **flash) == 2
    assert delta(before, after, "whisper_wer_sum", **flash) == pytest.approx(2 / 21)
    assert delta(before, after, "whisper_wer_bucket", le="0.0", **flash) == 1
    assert delta(before, after, "whisper_wer_bucket", le="0.1", **flash) == 2
    assert delta(before, after, "whisper_reference_errors_total", unit="word", **flash) == 2
    assert delta(before, after, "whisper_reference_units_total", unit="word", **flash) == 22 + 21
    assert delta(before, after, "whisper_reference_errors_total", unit="char", **flash) == 4


def test_metrics_object_and_headers_in_every_format(client, clips):
    jfk = clips["jfk"]
    body = post(client, jfk, model="tiny.en:flash", response_format="verbose_json").json()
    m = body["metrics"]
    assert (m["model"], m["variant"], m["audio_seconds"]) == ("tiny.en", "flash", jfk.duration)
    assert "wer" not in m and "cer" not in m  # no reference, no score
    assert m["total_seconds"] >= m["decode_seconds"] + m["queue_seconds"] + m["compute_seconds"] - 0.001
    assert m["rtfx"] == pytest.approx(jfk.duration / m["compute_seconds"], rel=0.01)
    assert m["batch_size"] == 1 and set(m["padding_ratio"]) == {"encoder", "decoder"}
    # The dynamic context runs the encoder over 15 s for this 11-s clip: 4 of 15 s are padding.
    assert m["padding_ratio"]["encoder"] == pytest.approx(4 / 15, abs=0.01)
    for response_format in ("json", "text", "srt", "vtt"):
        response = post(client, jfk, model="tiny.en:int8", response_format=response_format)
        assert response.status_code == 200
        assert response.headers["X-Model"] == "tiny.en:int8"
        for header in ("X-Queue-Seconds", "X-Compute-Seconds", "X-Total-Seconds", "X-RTFx", "X-Batch-Size",
                       "X-Padding-Ratio-Encoder", "X-Padding-Ratio-Decoder", "X-Audio-Seconds"):
            assert float(response.headers[header]) >= 0, header


def test_openai_sdk_sends_a_reference_and_reads_the_score(metrics_server, clips):
    from openai import OpenAI

    sdk = OpenAI(base_url=f"{metrics_server.url}/v1", api_key="not-needed", max_retries=0)
    with clips["jfk"].path.open("rb") as f:
        raw = sdk.audio.transcriptions.with_raw_response.create(
            model="tiny.en", file=f, response_format="verbose_json", extra_body={"reference": JFK_TWO_ERRORS}
        )
    assert float(raw.headers["x-wer"]) == pytest.approx(2 / 21, abs=1e-4)
    assert raw.parse().model_extra["metrics"]["wer"] == pytest.approx(2 / 21, abs=1e-4)


def test_a_reference_without_words_is_refused(client, clips):
    response = post(client, clips["jfk"], reference="...")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "reference"


def test_score_uses_the_basic_normalizer_outside_english():
    assert score("Guten Tag, liebe Welt!", "guten tag liebe welt", "de").wer == 0
    # The English normalizer spells numbers and British forms out the same on both sides; the basic one does not.
    assert score("I have 2 colours", "I have two colors", "en").wer == 0
    assert score("I have 2 colours", "I have two colors", "fr").wer == 0.5
    assert score("uh um", "hello", "en") is None  # nothing left to compare against


def test_cuda_memory_is_exported_when_cuda_is_present(monkeypatch):
    """No GPU here: torch's CUDA queries are stood in for (the one part that cannot be real on this
    machine); what is tested is that the exporter asks them per device and names the series right."""
    import torch
    from prometheus_client import generate_latest

    from app.metrics import Metrics
    from optim.engine import WhisperEngine
    from optim.scheduler import Scheduler, SchedulerConfig

    engine = WhisperEngine({"tiny.en": "tiny.en"}, device="cpu")
    metrics = Metrics(endpoints=["transcriptions"])
    metrics.watch(engine.models, Scheduler(engine, SchedulerConfig()))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: 1000 * (i + 1))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 5000 * (i + 1))
    samples = parse(generate_latest(metrics.registry).decode())
    assert value(samples, "whisper_cuda_memory_allocated_bytes", device="1") == 2000
    assert value(samples, "whisper_cuda_memory_reserved_bytes", device="0") == 5000
    assert value(samples, "whisper_queue_windows", model="tiny.en") == 0
    engine.close()
