"""The soak command (`python -m loadtest.soak`): its classification and report pieces on hand-made
values, and a short real soak against a spawned `tiny.en` server.

The real run calls `loadtest.soak.main(argv)` exactly as the command line does, for 0.4 minutes
at concurrency 4 (about a minute on 2 cores with the server's start), on the shared eval clips.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from loadtest import soak
from loadtest.workload import DEFAULT_EVAL_DIR

# -- pieces ------------------------------------------------------------------------------------


def test_float_wav_header_is_ieee_float_and_keeps_nan():
    data = soak.nan_wav(seconds=0.5)
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    assert struct.unpack("<I", data[4:8])[0] == len(data) - 8
    tag, channels, rate, byte_rate, align, bits = struct.unpack("<HHIIHH", data[20:36])
    assert (tag, channels, rate, byte_rate, align, bits) == (3, 1, 16_000, 64_000, 4, 32)
    payload = data.index(b"data") + 8
    samples = np.frombuffer(data[payload:], dtype="<f4")
    assert len(samples) == 8_000 and np.isnan(samples).sum() == len(range(0, 8_000, 7))


def test_answers_are_classified():
    assert soak.answer_class(200, None) == "2xx" and soak.answer_class(415, None) == "415"
    assert soak.answer_class(503, None) == "5xx" and soak.answer_class(None, "ConnectError: refused") == "transport_error"
    assert soak.answer_class(None, "ReadTimeout: ") == soak.answer_class(None, "timeout: no answer") == "timeout"

    assert soak.classify_normal(200, "hello", 0.1, 0.5) == "ok"
    assert soak.classify_normal(200, "someone else's words", 0.95, 0.5) == "mixed_up"
    assert soak.classify_normal(500, None, None, 0.5) == soak.classify_normal(None, None, None, 0.5) == "lost"
    assert soak.classify_normal(200, None, None, 0.5) == "lost"  # a 200 without a transcript
    assert soak.classify_normal(429, None, None, 0.5) == "refused"

    shaped = {"error": {"message": "the file is empty", "type": "invalid_request_error", "param": "file", "code": "empty_file"}}
    assert soak.classify_bad(400, shaped) == "refused"
    assert soak.classify_bad(400, {"detail": "FastAPI's own shape"}) == "bad_error_shape"
    assert soak.classify_bad(400, {"error": {**shaped["error"], "message": ""}}) == "bad_error_shape"
    assert soak.classify_bad(500, shaped) == "server_error" and soak.classify_bad(None, None) == "unanswered"
    assert soak.classify_bad(200, {"text": "hi"}) == "accepted"
    assert soak.classify_bad(200, {"text": "hi"}, wer=0.1) == "transcribed"  # the prompt taken as plain text
    assert soak.classify_bad(200, {"text": "hi"}, wer=0.9) == "accepted"


def test_an_answer_is_matched_against_its_own_reference_with_bracketed_words_kept():
    reference = "But the first Bible actually dated (which also was printed at Maintz by Peter Schoeffer in the year 1462)"
    right = "But the first Bible actually dated, which also was printed at Mainz by Peter Schoeffer in the year 1462."
    assert soak.answer_wer(reference, right) < 0.1  # Whisper's normalizer alone would drop 13 of 19 words
    assert soak.answer_wer(reference, "And the printing of the exhibition differs from the arts and crafts.") > 0.5


def test_memory_growth_is_measured_from_the_first_sample_after_warm_up():
    samples = [{"t_s": t, "rss_bytes": mb * 2**20} for t, mb in [(0, 100), (5, 400), (10, 500), (15, 440)]]
    memory = soak.memory_summary(samples, warm_up_s=5)
    assert (memory["after_warm_up_mb"], memory["peak_mb"], memory["end_mb"]) == (400, 500, 440)
    assert memory["growth_pct"] == pytest.approx(10.0)
    assert soak.memory_summary([{"t_s": 0, "rss_bytes": None}], 5)["growth_pct"] is None


def test_secrets_stay_out_of_the_report():
    argv = ["--minutes", "1", "--api-key", "k1", "--env", "API_KEYS=k1,k2", "--env=API_KEYS=k3", "--env", "MODELS=base"]
    shown = " ".join(soak.redact_argv(argv))
    assert "k1" not in shown and "k3" not in shown and "MODELS=base" in shown
    assert soak.redact_env({"API_KEYS": "k1", "MODELS": "base"}) == {"API_KEYS": "***", "MODELS": "base"}


# -- a real soak -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_short_soak_against_a_spawned_server(tmp_path, capsys):
    if not (DEFAULT_EVAL_DIR / "en_read" / "manifest.jsonl").is_file():
        pytest.skip(f"no eval clips at {DEFAULT_EVAL_DIR}")
    argv = [
        "--minutes", "0.4", "--concurrency", "4", "--model", "tiny.en", "--env", "MODELS=tiny.en",
        "--bad-share", "0.35", "--disconnect-share", "0.15", "--sample-s", "2", "--out", str(tmp_path), "--name", "short",
    ]  # fmt: skip
    code = soak.main(argv)

    for suffix in ("json", "md", "png"):
        assert (tmp_path / f"short.{suffix}").stat().st_size > 0, suffix
    document = json.loads((tmp_path / "short.json").read_text())
    failures = {k: v for k, v in document["failures"].items() if v}
    failed = sorted({(r["kind"], r["name"], r["answer"], (r["error"] or "")[:160]) for r in document["records"]
                     if r["outcome"] not in soak.GOOD_OUTCOMES[r["kind"]]})  # fmt: skip
    assert code == 0 and document["passed"], f"failures {failures}; failed requests: {failed}"
    assert document["failures"]["5xx"] == document["failures"]["lost"] == document["failures"]["mixed_up"] == 0

    # Every kind was exercised, and the figures are there.
    requests = document["requests"]
    assert requests.get("normal", 0) > 0 and requests.get("bad", 0) > 0 and requests.get("disconnect", 0) > 0
    assert document["outcomes"]["disconnect"].get("disconnected", 0) > 0
    assert document["outcomes"]["bad"].get("refused", 0) > 0
    assert 0 < document["latency_s"]["p50"] <= document["latency_s"]["p95"]
    memory = document["memory"]
    assert memory["after_warm_up_mb"] > 0 and memory["peak_mb"] >= memory["end_mb"] > 0
    assert len(document["samples"]) >= 5 and any(s["queue_windows"] is not None for s in document["samples"])
    assert document["intervals"] and document["end_health"]["/health"] == 200
    markdown = (tmp_path / "short.md").read_text()
    assert "| result | PASS |" in markdown and "python -m loadtest.soak --minutes 0.4" in markdown
    assert "| result | PASS |" in capsys.readouterr().out
