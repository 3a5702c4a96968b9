"""A real Prometheus scrapes the service during real transcriptions; then every PromQL expression
of the Grafana dashboard must parse and return data, and the dashboard's variables must list the
served models and variants. Needs Debian's `prometheus` package (`make test` installs it)."""

from __future__ import annotations

import math
import re
import subprocess

import httpx
import pytest

from loadtest.prometheus import (
    DASHBOARD,
    Prometheus,
    binary,
    dashboard_queries,
    parse_label_values,
    substitute,
    template_queries,
)
from tests.conftest import Server

pytestmark = pytest.mark.skipif(
    binary() is None,
    reason="PROMETHEUS NOT INSTALLED: the dashboard's queries were NOT checked against a real Prometheus "
    "(`make test` installs Debian's prometheus package; run it as root or with sudo)",
)

VARIANTS = ("flash", "int8")
# jfk's reference with one word changed, in the first round only: the first scored requests
# carry errors the second round does not, so losing them would change the corpus WER.
REFERENCES = {"jfk": "And so my yellow Americans, ask not what your country can do for you, ask what you can do for your country."}
# Series that exist only with CUDA: on this CPU-only machine their queries must parse and come back empty.
CUDA_ONLY = re.compile(r"whisper_cuda_\w+")


@pytest.fixture(scope="module")
def scraped(clips):
    """A server and a Prometheus scraping it every second, after two rounds of requests (so that
    every rate() has two different samples to compare): per variant, clips with a reference, a
    long one that shares batches, a refused upload and a streamed one; and a realtime session (one
    server_vad turn with interim deltas)."""
    with (
        Server(MODELS="tiny.en", DEFAULT_MODEL="tiny.en", PRELOAD_VARIANTS="tiny.en:flash,tiny.en:int8") as server,
        Prometheus(target=server.url.removeprefix("http://"), interval="1s") as prometheus,
        httpx.Client(base_url=server.url, timeout=300) as client,
    ):
        prometheus.wait_for_scrapes(2)
        for round_ in range(2):
            for variant in VARIANTS:
                for clip in (clips["jfk"], clips["lj-LJ001-0002"]):
                    reference = REFERENCES.get(clip.id, clip.text) if round_ == 0 else clip.text
                    response = client.post(
                        "/v1/audio/transcriptions",
                        files={"file": (clip.path.name, clip.data)},
                        data={"model": f"tiny.en:{variant}", "reference": reference},
                    )
                    assert response.status_code == 200, response.text
                refused = client.post(
                    "/v1/audio/transcriptions", files={"file": ("x.wav", b"not audio")}, data={"model": f"tiny.en:{variant}"}
                )
                assert refused.status_code == 415
                streamed = client.post(  # stream=true: the first-delta latency
                    "/v1/audio/transcriptions", files={"file": ("jfk.flac", clips["jfk"].data)},
                    data={"model": f"tiny.en:{variant}", "stream": "true"},
                )
                assert streamed.status_code == 200 and "transcript.text.done" in streamed.text
            realtime_turn(server.url, clips["jfk"])
            prometheus.wait_for_scrapes(3)
        yield prometheus


def realtime_turn(url: str, clip) -> None:
    """One realtime session: the clip and some silence at twice real time, with server_vad, until
    its turn is completed (interim deltas on the way: the realtime panels have data)."""
    import asyncio

    from tests.test_realtime import Run, client, collect_until, pcm, receive, send_audio, silence

    async def go() -> Run:
        run = Run()
        async with client(url).realtime.connect(model="tiny.en") as conn:
            await receive(conn)
            sender = asyncio.create_task(send_audio(conn, pcm(clip.path) + silence(1.5)))
            await collect_until(conn, run, lambda r: bool(r.of("conversation.item.input_audio_transcription.completed")))
            await sender
        return run

    run = asyncio.run(go())
    assert run.of("conversation.item.input_audio_transcription.delta")


def _finite(result: list[dict]) -> list[float]:
    return [float(s["value"][1]) for s in result if math.isfinite(float(s["value"][1]))]


QUERIES = dashboard_queries()


def test_the_dashboard_has_queries():
    assert len(QUERIES) >= 15, f"{DASHBOARD} holds only {len(QUERIES)} queries"


@pytest.mark.parametrize("query", QUERIES, ids=[f"{q.panel}: {q.expr[:60]}" for q in QUERIES])
def test_every_dashboard_query_parses_and_returns_data(scraped, query):
    expr = substitute(query.expr)
    result = scraped.query(expr)  # raises QueryError if Prometheus cannot parse or run it
    if CUDA_ONLY.search(expr):
        assert result == [], "CUDA series on a machine without CUDA"
        return
    assert _finite(result), f"{query.panel}: {expr} returned no finite value: {result}"


def test_per_variant_panels_compare_both_variants(scraped):
    """A panel that compares variants shows one series per variant that served requests."""
    by_variant = [q for q in QUERIES if "by (model, variant)" in q.expr.replace("by(", "by (") and not CUDA_ONLY.search(q.expr)]
    assert by_variant
    for query in by_variant:
        variants = {s["metric"].get("variant") for s in scraped.query(substitute(query.expr))}
        assert set(VARIANTS) <= variants, (query.panel, query.expr, variants)


def test_template_variables_list_the_served_names(scraped):
    values = {}
    for name, query in template_queries():
        match, label = parse_label_values(query)
        values[name] = set(scraped.label_values(label, match or "{__name__=~'whisper_.+'}"))
    assert values.get("model", set()) >= {"tiny.en"} and values.get("variant", set()) >= set(VARIANTS)


def test_throughput_and_wer_queries_agree_with_what_was_sent(scraped, clips):
    audio = sum(float(s["value"][1]) for s in scraped.query("sum by (model, variant) (whisper_audio_seconds_total)"))
    # per round and variant: jfk and LJ001-0002 with references, jfk streamed
    sent = 2 * len(VARIANTS) * (2 * clips["jfk"].duration + clips["lj-LJ001-0002"].duration)
    assert audio == pytest.approx(sent, abs=0.1)  # the manifest rounds durations to 0.1 s
    words = scraped.query('sum(whisper_reference_units_total{unit="word"})')
    assert float(words[0]["value"][1]) == 2 * len(VARIANTS) * (len(clips["jfk"].text.split()) + len(clips["lj-LJ001-0002"].text.split()))


def test_promtool_accepts_the_config_it_scraped_with(scraped):
    promtool = binary("promtool")
    assert promtool, "the prometheus package ships promtool"
    check = subprocess.run([promtool, "check", "config", str(scraped.config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_dashboard_renders_from_prometheus(scraped, tmp_path):
    """`python -m loadtest.dashboard`'s drawing step on this run's data: every panel but CUDA's has series."""
    import time

    from loadtest.dashboard import draw, evaluate

    end = time.time()
    panels = evaluate(scraped, QUERIES, end - 60, end)
    expected = {q.panel for q in QUERIES if not CUDA_ONLY.search(q.expr)}
    assert expected <= {title for title, series in panels.items() if series}
    draw(panels, tmp_path / "dashboard.png", "test run")
    assert (tmp_path / "dashboard.png").stat().st_size > 50_000


def test_corpus_wer_over_a_range_counts_the_first_request(scraped):
    """The dashboard's corpus WER is increase(errors) / increase(words). The counters of preloaded
    variants exist at zero from the start, so the first scored request is not lost to increase()
    (a series first seen at 1 would count from 1): over a range covering the run it equals the
    counters' own ratio."""
    for variant in VARIANTS:
        selector = f'model="tiny.en", variant="{variant}", unit="word"'
        total = scraped.query(f"sum(whisper_reference_errors_total{{{selector}}}) / sum(whisper_reference_units_total{{{selector}}})")
        ranged = scraped.query(
            f"sum(increase(whisper_reference_errors_total{{{selector}}}[1h])) / sum(increase(whisper_reference_units_total{{{selector}}}[1h]))"
        )
        assert float(ranged[0]["value"][1]) == pytest.approx(float(total[0]["value"][1]), rel=1e-9)
        # Histograms too: every scored request counts, the first included (2 rounds of 2 clips).
        scored = scraped.query(f'sum(increase(whisper_wer_count{{model="tiny.en", variant="{variant}"}}[1h]))')
        assert round(float(scored[0]["value"][1])) == 4  # increase() extrapolates a little past the last scrape
