"""Measure the running service end to end, with openai-whisper itself as the anchor.

    python -m benchmarks.service [--manifest ../shared/eval/en_read/manifest.jsonl] [--models tiny.en,base]

Starts `python -m app` on a loopback port, and for each model measures: load time (from
/ready), the latency of jfk.flac through the official `openai` SDK (median of 5 after a
warm-up), the server's resident memory, and corpus WER over the manifest. In the same run it
transcribes the same decoded audio with openai-whisper's own `transcribe()` on the same
weights, so the service's accuracy and speed stand beside the reference. Results go to
benchmarks/service_baseline.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
import whisper
from openai import OpenAI
from tqdm import tqdm

from benchmarks.common import RESULTS, ROOT, machine_info
from loadtest.server import free_port, wait_until_ready
from optim.accuracy import corpus_wer
from optim.audio import decode_audio
from optim.evaluation import EVAL_DIR, read_manifest
from optim.memory import rss_mb
from optim.weights import load_whisper

JFK = ROOT / "tests" / "data" / "jfk.flac"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, default=EVAL_DIR / "en_read" / "manifest.jsonl")
    parser.add_argument("--models", default="tiny.en,base")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "service_baseline")
    args = parser.parse_args()
    models = args.models.split(",")
    items = [i for i in read_manifest(args.manifest) if i.get("text")]
    audio_seconds = sum(i["duration_s"] for i in items)

    port = free_port()
    env = {**os.environ, "PORT": str(port), "MODELS": args.models, "DEFAULT_MODEL": models[0], "LOG_LEVEL": "warning"}
    server = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=env)
    results: dict = {"machine": machine_info(), "manifest": str(args.manifest), "clips": len(items), "audio_seconds": audio_seconds, "models": {}}
    try:
        url = f"http://127.0.0.1:{port}"
        results["server_ready_seconds"] = round(wait_until_ready(url, server, None), 2)
        ready = httpx.get(f"{url}/ready", timeout=5)
        results["rss_after_load_mb"] = round(rss_mb(server.pid)[0], 1)
        client = OpenAI(base_url=f"{url}/v1", api_key="none", timeout=600, max_retries=0)

        for model in models:
            row: dict = {"load_seconds": ready.json()["load_seconds"][model]}
            latencies = []
            for _ in range(args.repeats + 1):
                with open(JFK, "rb") as f:
                    start = time.perf_counter()
                    client.audio.transcriptions.create(model=model, file=f)
                    latencies.append(time.perf_counter() - start)
            row["jfk_latency_s"] = round(statistics.median(latencies[1:]), 3)

            hypotheses = []
            start = time.perf_counter()
            for item in tqdm(items, desc=f"service {model}"):
                with open(args.manifest.parent / item["audio"], "rb") as f:
                    hypotheses.append(client.audio.transcriptions.create(model=model, file=f, language="en").text)
            elapsed = time.perf_counter() - start
            row["service_wer"] = round(100 * corpus_wer([i["text"] for i in items], hypotheses), 2)
            row["service_rtfx"] = round(audio_seconds / elapsed, 2)
            results["models"][model] = row
        results["server_rss_mb"], results["server_peak_rss_mb"] = (round(x, 1) for x in rss_mb(server.pid))
    finally:
        server.terminate()
        server.wait(timeout=30)

    # The anchor: openai-whisper's transcribe() on the same weights and the same decoded audio.
    for model in models:
        reference_model = load_whisper(model)
        samples = [decode_audio((args.manifest.parent / i["audio"]).read_bytes()).samples for i in items]
        jfk = torch.from_numpy(decode_audio(JFK.read_bytes()).samples)
        latencies = []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            whisper.transcribe(reference_model, jfk, fp16=False, verbose=None)
            latencies.append(time.perf_counter() - start)
        hypotheses = []
        start = time.perf_counter()
        for audio in tqdm(samples, desc=f"openai-whisper {model}"):
            hypotheses.append(whisper.transcribe(reference_model, torch.from_numpy(audio), fp16=False, verbose=None, language="en")["text"])
        elapsed = time.perf_counter() - start
        row = results["models"][model]
        row["openai_whisper_jfk_latency_s"] = round(statistics.median(latencies[1:]), 3)
        row["openai_whisper_wer"] = round(100 * corpus_wer([i["text"] for i in items], hypotheses), 2)
        row["openai_whisper_rtfx"] = round(audio_seconds / elapsed, 2)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(results))
    print(_markdown(results))


def _markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['threads']} threads), "
        f"openai-whisper {m['versions']['openai-whisper']}. Corpus: {r['clips']} clips, {r['audio_seconds']:.1f} s ({Path(r['manifest']).parent.name}).",
        "",
        "| model | load (s) | jfk.flac latency, service (s) | jfk.flac, openai-whisper (s) | WER service | WER openai-whisper | RTFx service | RTFx openai-whisper |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in r["models"].items():
        lines.append(
            f"| {name} | {row['load_seconds']} | {row['jfk_latency_s']} | {row['openai_whisper_jfk_latency_s']} | "
            f"{row['service_wer']} % | {row['openai_whisper_wer']} % | {row['service_rtfx']} | {row['openai_whisper_rtfx']} |"
        )
    lines += [
        "",
        f"Server: ready {r['server_ready_seconds']} s after start; resident memory {r['rss_after_load_mb']} MB with all models "
        f"loaded, {r['server_rss_mb']} MB after the run (peak {r['server_peak_rss_mb']} MB).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
