"""The load-test tool: its arithmetic on hand-made numbers, and whole runs against real servers.

The end-to-end tests call `loadtest.cli.main(argv)` exactly as `python -m loadtest` does, with
`tiny.en` and a few short clips so that they stay well under a minute on 2 cores.
"""

from __future__ import annotations

import json

import pytest

from loadtest import metrics, stats
from loadtest.cli import main
from loadtest.workload import build_workload
from tests.conftest import CLIPS, ENGLISH_READ, Server, english_wer


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    """An eval tree in the layout the tool reads (`en_read/`, `en_untranscribed/`), made of the
    repository's own English clips, so the tests need nothing outside it."""
    root = tmp_path_factory.mktemp("eval")
    english = [c for c in CLIPS.values() if c.lang == "en" and c.duration < 35]
    sets = {
        "en_read": [(c.id, c, c.text) for c in ENGLISH_READ],
        "en_untranscribed": [(f"u-{c.id}", c, None) for c in english],
    }
    for name, rows in sets.items():
        (root / name).mkdir()
        lines = [json.dumps({"id": i, "audio": str(c.path), "duration_s": c.duration, "text": t}) for i, c, t in rows]
        (root / name / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root

# -- arithmetic --------------------------------------------------------------------------------


def test_percentiles_throughput_and_agreement_on_hand_made_numbers():
    # numpy's linear interpolation over 5 sorted values: rank p/100 * 4.
    p = stats.latency_percentiles([5.0, 1.0, 3.0, 2.0, 4.0])
    assert p == pytest.approx({"p50": 3.0, "p95": 4.8, "p99": 4.96})
    assert stats.latency_percentiles([]) == {"p50": None, "p95": None, "p99": None}

    # 60 s of audio answered in 12 s of wall time: 5 audio-s/s, 3 requests in 12 s: 0.25 req/s.
    assert stats.audio_throughput([10.0, 20.0, 30.0], 12.0) == pytest.approx(5.0)
    assert stats.request_rate(3, 12.0) == pytest.approx(0.25)
    assert stats.audio_throughput([], 0.0) == 0.0

    # Items both sides answered: a (3 words, same) and b (2 words, one substituted): 1 error / 5 words.
    # Case and punctuation do not count (Whisper's normalizer); item c has no baseline and is left out.
    baseline = {"a": "The cat sat.", "b": "hello world"}
    other = {"a": "the cat sat", "b": "Hello, word!", "c": "not in the baseline"}
    assert stats.transcript_agreement(baseline, other) == pytest.approx(0.2)
    assert stats.transcript_agreement(baseline, baseline) == 0.0
    assert stats.transcript_agreement(baseline, {"x": "nothing shared"}) is None
    # The same corpus WER as the test suite's own helper.
    refs, hyps = ["The cat sat.", "hello world"], ["the cat sat", "Hello, word!"]
    assert stats.word_error_rate(refs, hyps) == pytest.approx(english_wer(refs, hyps))


SCRAPE_BEFORE = """\
# HELP whisper_batch_size Requests per model call.
# TYPE whisper_batch_size histogram
whisper_batch_size_bucket{model="base",variant="flash",le="1.0"} 2.0
whisper_batch_size_bucket{model="base",variant="flash",le="+Inf"} 2.0
whisper_batch_size_sum{model="base",variant="flash"} 2.0
whisper_batch_size_count{model="base",variant="flash"} 2.0
# TYPE whisper_batch_padding_ratio histogram
whisper_batch_padding_ratio_bucket{model="base",variant="flash",stage="encoder",le="+Inf"} 2.0
whisper_batch_padding_ratio_sum{model="base",variant="flash",stage="encoder"} 0.0
whisper_batch_padding_ratio_count{model="base",variant="flash",stage="encoder"} 2.0
"""

# After the run: 3 more calls of flash holding 4 + 4 + 1 requests; another variant also ran.
SCRAPE_AFTER = """\
# TYPE whisper_batch_size histogram
whisper_batch_size_bucket{model="base",variant="flash",le="+Inf"} 5.0
whisper_batch_size_sum{model="base",variant="flash"} 11.0
whisper_batch_size_count{model="base",variant="flash"} 5.0
whisper_batch_size_sum{model="base",variant="int8+flash"} 100.0
whisper_batch_size_count{model="base",variant="int8+flash"} 10.0
# TYPE whisper_batch_padding_ratio histogram
whisper_batch_padding_ratio_bucket{model="base",variant="flash",stage="encoder",le="+Inf"} 5.0
whisper_batch_padding_ratio_sum{model="base",variant="flash",stage="encoder"} 0.6
whisper_batch_padding_ratio_count{model="base",variant="flash",stage="encoder"} 5.0
whisper_batch_padding_ratio_sum{model="base",variant="flash",stage="decoder"} 0.9
whisper_batch_padding_ratio_count{model="base",variant="flash",stage="decoder"} 3.0
"""


@pytest.mark.parametrize("parser", ["prometheus_client", "plain"])
def test_batching_means_are_deltas_of_histogram_sums_and_counts(parser, monkeypatch):
    if parser == "prometheus_client":
        pytest.importorskip("prometheus_client")
    else:
        monkeypatch.setattr(metrics, "parse_samples", metrics.parse_text_format)
    means = metrics.batching_means(metrics.snapshot(SCRAPE_BEFORE), metrics.snapshot(SCRAPE_AFTER), "base", "flash")
    assert means["mean_batch_size"] == pytest.approx(9 / 3)
    assert means["encoder_padding"] == pytest.approx(0.6 / 3)
    assert means["decoder_padding"] == pytest.approx(0.3)  # absent before the run: counted from zero
    # No /metrics, no such variant, or no observation during the run: n/a, never an error.
    assert metrics.batching_means(None, None, "base", "flash") == dict.fromkeys(means)
    assert metrics.batching_means(
        metrics.snapshot(SCRAPE_AFTER), metrics.snapshot(SCRAPE_AFTER), "base", "flash"
    ) == dict.fromkeys(means)
    assert metrics.batching_means(None, metrics.snapshot(SCRAPE_AFTER), "tiny.en", "flash")["mean_batch_size"] is None


def test_plain_parser_reads_escaped_label_values():
    samples = metrics.parse_text_format('m_sum{a="x\\"y",b="c,d"} 1.5\nm_count 2\n')
    assert [(s.name, s.labels, s.value) for s in samples] == [("m_sum", {"a": 'x"y', "b": "c,d"}, 1.5), ("m_count", {}, 2.0)]


def test_workload_is_seeded_mixed_and_within_the_duration_cap(eval_dir):
    first, again = build_workload(8, seed=0, eval_dir=eval_dir), build_workload(8, seed=0, eval_dir=eval_dir)
    assert [i.id for i in first.items] == [i.id for i in again.items]
    assert [i.id for i in build_workload(8, seed=1, eval_dir=eval_dir).items] != [i.id for i in first.items]
    # A quarter referenced (en_read), the rest unreferenced, shuffled together.
    assert sum(i.reference is not None for i in first.items) == 2
    assert len({i.id for i in first.items}) == 8
    assert all(i.audio and len(i.audio) == i.path.stat().st_size for i in first.items)
    short = build_workload(4, seed=0, eval_dir=eval_dir, max_duration=8.0)
    assert max(i.duration for i in short.items) <= 8.0


# -- whole runs against real servers -----------------------------------------------------------


def _check_runs(document: dict, requests: int) -> None:
    for run in document["runs"]:
        where = f"{run['config']} {run['model_name']} × {run['concurrency']}"
        assert run["errors"] == 0, where
        assert len(run["requests"]) == requests and run["completed"] == requests, where
        assert run["audio_s_per_s"] > 0 and run["requests_per_s"] > 0, where
        latency = run["latency_s"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"], where
        if run["wer_items"]:
            assert run["wer"] < 0.5, where
        assert set(run["transcripts"]) == {r["id"] for r in run["requests"]}, where


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_spawned_batched_and_unbatched_servers(tmp_path, capsys, eval_dir):
    argv = ["--spawn", "--model", "tiny.en", "--variants", "flash", "--concurrency", "1,2", "--requests", "4", "--quick"]
    argv += ["--eval-dir", str(eval_dir)]
    assert main([*argv, "--out", str(tmp_path)]) == 0

    for name in ("loadtest.json", "loadtest.md", "loadtest_throughput.png", "loadtest_latency.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    document = json.loads((tmp_path / "loadtest.json").read_text())
    assert document["workload"]["count"] == 4 and document["workload"]["duration_max_s"] <= 8.0
    assert [(r["config"], r["concurrency"]) for r in document["runs"]] == [
        ("batched", 1),
        ("batched", 2),
        ("unbatched", 1),
        ("unbatched", 2),
    ]
    _check_runs(document, requests=4)
    # Batching must not change the words: agreement with the unbatched server's transcripts.
    assert document["baseline"] == "unbatched"
    assert [(a["config"], a["concurrency"]) for a in document["agreement"]] == [("batched", 1), ("batched", 2)]
    assert all(a["wer"] is not None and a["wer"] < 0.5 for a in document["agreement"])
    # The server logs went to files, and the table to the terminal.
    assert (tmp_path / "loadtest_server_batched.log").exists() and (tmp_path / "loadtest_server_unbatched.log").exists()
    assert "| unbatched | 2 |" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_running_server_given_by_url(tmp_path, eval_dir):
    server = Server(MODELS="tiny.en", DEFAULT_MODEL="tiny.en", PRELOAD_VARIANTS="tiny.en:flash").wait_ready()
    try:
        argv = [
            "--url",
            server.url,
            "--model",
            "tiny.en",
            "--variants",
            "flash",
            "--concurrency",
            "2",
            "--requests",
            "4",
            "--quick",
            "--eval-dir",
            str(eval_dir),
        ]
        assert main([*argv, "--out", str(tmp_path), "--name", "external"]) == 0
    finally:
        server.stop()
    document = json.loads((tmp_path / "external.json").read_text())
    assert [r["config"] for r in document["runs"]] == ["external"] and document["agreement"] == []
    _check_runs(document, requests=4)
    assert "one configuration only" in (tmp_path / "external.md").read_text()
