"""Benchmark every model × variant against openai-whisper and faster-whisper, in one run.

    python -m benchmarks.variants [--manifest ../shared/eval/en_read/manifest.jsonl]
                          [--models tiny.en,base] [--variants fp32,fp16,int8,winograd,flash,int8+flash]
                          [--out benchmarks/variants]

Each configuration runs in a fresh process (so its peak memory is its own), transcribes every
clip of the manifest one at a time with the same options (greedy with openai-whisper's
temperature fallback, timestamps on, language `en`, no conditioning on previous text), after
one warm-up clip, and reports: RTFx (audio seconds / processing seconds), p50/p95 latency per
clip, peak and steady resident memory, the model's weight bytes, and corpus WER/CER after
Whisper's English normalizer. Anchor rows, on the same weights and clips: openai-whisper's
`transcribe()` as shipped, and faster-whisper (CTranslate2) float32 and int8.

Writes `<out>.json`, `<out>.md` and `<out>_speed_accuracy.png`, `<out>_memory.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, ROOT, machine_info
from optim.evaluation import EVAL_DIR, read_manifest
from optim.memory import release_freed_memory, rss_mb

DEFAULT_MANIFEST = EVAL_DIR / "en_read" / "manifest.jsonl"
DEFAULT_VARIANTS = "fp32,fp16,int8,winograd,flash,int8+flash,int8+winograd+flash"
ANCHORS = ("openai-whisper", "faster-whisper:float32", "faster-whisper:int8")


# ------------------------------------------------------------------------------ one configuration


def _load_transcriber(model_name: str, engine: str, workdir: Path):
    """A function samples -> text for one configuration, and the model's weight bytes."""
    if engine.startswith("faster-whisper"):
        from faster_whisper import WhisperModel

        from optim.weights import ctranslate2_folder

        folder = ctranslate2_folder(model_name, workdir)
        compute_type = engine.split(":")[1]
        model = WhisperModel(str(folder), device="cpu", compute_type=compute_type, cpu_threads=os.cpu_count() or 1)

        def transcribe(samples: np.ndarray) -> str:
            segments, _ = model.transcribe(samples, language="en", beam_size=1, condition_on_previous_text=False)
            return "".join(s.text for s in segments)

        return transcribe, None

    import torch
    import whisper

    from optim.registry import build_variant, parse_variant
    from optim.variants.modules import nbytes
    from optim.weights import load_whisper

    source = load_whisper(model_name)
    model = source if engine == "openai-whisper" else build_variant(source, parse_variant(engine), in_place=True)
    del source
    release_freed_memory()

    def transcribe(samples: np.ndarray) -> str:
        with torch.inference_mode():
            result = whisper.transcribe(
                model, torch.from_numpy(samples), language="en", fp16=False, verbose=None, condition_on_previous_text=False
            )
        return result["text"]

    return transcribe, nbytes(model)


def run_configuration(model_name: str, engine: str, manifest: Path, workdir: Path) -> dict:
    import torch
    from jiwer import cer
    from tqdm import tqdm

    from optim.accuracy import corpus_wer, normalizer
    from optim.audio import SAMPLE_RATE, decode_audio

    torch.set_num_threads(os.cpu_count() or 1)
    items = [i for i in read_manifest(manifest) if i.get("text")]
    audio = [decode_audio((manifest.parent / i["audio"]).read_bytes()).samples for i in items]

    start = time.perf_counter()
    transcribe, weight_bytes = _load_transcriber(model_name, engine, workdir)
    load_seconds = time.perf_counter() - start
    steady_mb = rss_mb()[0]
    transcribe(audio[0])  # warm-up: first-call allocations and kernel selection

    latencies, hypotheses = [], []
    for samples in tqdm(audio, desc=f"{model_name} {engine}", leave=False, file=sys.stderr):
        start = time.perf_counter()
        hypotheses.append(transcribe(samples))
        latencies.append(time.perf_counter() - start)

    normalize = normalizer("en")
    references = [i["text"] for i in items]
    audio_seconds = sum(len(a) for a in audio) / SAMPLE_RATE
    return {
        "model": model_name,
        "engine": engine,
        "clips": len(items),
        "audio_seconds": round(audio_seconds, 2),
        "processing_seconds": round(sum(latencies), 3),
        "rtfx": round(audio_seconds / sum(latencies), 2),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p95_s": round(float(np.percentile(latencies, 95)), 3),
        "wer": round(100 * corpus_wer(references, hypotheses), 2),
        "cer": round(100 * cer([normalize(r) for r in references], [normalize(h) or "<empty>" for h in hypotheses]), 2),
        "load_seconds": round(load_seconds, 2),
        "weights_mb": None if weight_bytes is None else round(weight_bytes / 2**20, 1),
        "rss_steady_mb": round(steady_mb, 1),
        "rss_peak_mb": round(rss_mb()[1], 1),
        "hypotheses": hypotheses,
    }


# ------------------------------------------------------------------------------ the whole run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    parser.add_argument("--models", default="tiny.en,base")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--no-anchors", action="store_true", help="skip openai-whisper and faster-whisper")
    parser.add_argument("--out", type=Path, default=RESULTS / "variants")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one configuration
    args = parser.parse_args()

    workdir = Path(tempfile.gettempdir()) / "whisper-serve-bench"
    if args.worker:
        model_name, engine = args.worker.split("|")
        print(json.dumps(run_configuration(model_name, engine, args.manifest, workdir)))
        return

    from tqdm import tqdm

    engines = args.variants.split(",") + ([] if args.no_anchors else list(ANCHORS))
    configurations = [(m, e) for m in args.models.split(",") for e in engines]
    rows = []
    for model_name, engine in tqdm(configurations, desc="configurations"):
        worker = subprocess.run(
            [sys.executable, "-m", "benchmarks.variants", "--manifest", str(args.manifest), "--worker", f"{model_name}|{engine}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        rows.append(json.loads(worker.stdout.strip().splitlines()[-1]))
    results = {"machine": machine_info(), "manifest": str(args.manifest), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results))
    charts(results, args.out)
    print(markdown(results))


def markdown(results: dict) -> str:
    m = results["machine"]
    rows = results["rows"]
    first = rows[0]
    lines = [
        f"Machine: {m['cpu']} ({m['cores']} cores; {', '.join(m['isa'])}); "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f"; {m['date']}.",
        f"Corpus: `{Path(results['manifest']).parent.name}`, {first['clips']} clips, {first['audio_seconds']} s; "
        "one clip at a time, greedy with temperature fallback, language en.",
        "",
        "| model | engine / variant | RTFx | × fp32 | p50 latency (s) | p95 latency (s) | WER % | CER % | weights (MB) | RSS steady (MB) | RSS peak (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        baseline = next((r for r in rows if r["model"] == row["model"] and r["engine"] == "fp32"), None)
        speedup = f"{row['rtfx'] / baseline['rtfx']:.2f}" if baseline else "–"
        weights = "–" if row["weights_mb"] is None else row["weights_mb"]
        lines.append(
            f"| {row['model']} | {row['engine']} | {row['rtfx']} | {speedup} | {row['latency_p50_s']} | {row['latency_p95_s']} | "
            f"{row['wer']} | {row['cer']} | {weights} | {row['rss_steady_mb']} | {row['rss_peak_mb']} |"
        )
    return "\n".join(lines) + "\n"


def charts(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    figure, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5), squeeze=False)
    for axis, model_name in zip(axes[0], models):
        for row in (r for r in rows if r["model"] == model_name):
            anchor = row["engine"] in ANCHORS
            axis.scatter(row["rtfx"], row["wer"], marker="s" if anchor else "o", color="grey" if anchor else "tab:blue")
            axis.annotate(row["engine"], (row["rtfx"], row["wer"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axis.set_title(f"{model_name}: speed vs accuracy")
        axis.set_xlabel("RTFx (audio s / processing s, higher is better)")
        axis.set_ylabel("WER % (lower is better)")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(f"{out}_speed_accuracy.png", dpi=110)

    figure, axis = plt.subplots(figsize=(max(8, 0.6 * len(rows)), 5))
    labels = [f"{r['model']}\n{r['engine']}" for r in rows]
    positions = np.arange(len(rows))
    axis.bar(positions - 0.2, [r["rss_peak_mb"] for r in rows], 0.4, label="peak RSS")
    axis.bar(positions + 0.2, [r["weights_mb"] or 0 for r in rows], 0.4, label="model weights")
    axis.set_xticks(positions, labels, rotation=60, ha="right", fontsize=7)
    axis.set_ylabel("MB")
    axis.set_title("Memory per configuration")
    axis.legend()
    figure.tight_layout()
    figure.savefig(f"{out}_memory.png", dpi=110)


if __name__ == "__main__":
    main()
