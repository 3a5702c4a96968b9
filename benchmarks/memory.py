"""`python -m benchmarks.memory`: what the service's memory costs, and what bounds it.

Two measurements, each process fresh so that its peak (VmHWM) is its own:

* **build**: a model loaded in-process with one variant, the way the server loads it
  (`WhisperEngine(...).models.load`): RSS after the imports, after the build, and the peak while
  building (an int8-only model is built from the stored float16 weights, never a float32 copy);
* **batch audio**: the service over HTTP (`MODELS=base`, default variant), one fresh server per
  `MAX_BATCH_AUDIO_SECONDS` setting and workload (the peers benchmark's `16 clients` and
  `longform`, benchmarks/peers.py), with its speed, WER, peak RSS and RSS after ready and after
  the workload. The setting caps a batch's padded audio, and with it the cross-attention keys/
  values that make up most of a batch's working memory; with two lanes two batches run at once.

Writes benchmarks/memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BUILDS = (("base", "int8+flash"), ("base", "flash"), ("tiny.en", "int8+flash"))
WORKLOADS = ("16 clients", "longform")


def _build_child(model: str, variant: str) -> dict:
    """In a fresh process: RSS after the imports, then after building `model:variant`, and the peak."""
    import torch

    from optim.engine import WhisperEngine
    from optim.memory import anonymous_mb, rss_mb

    torch.set_grad_enabled(False)
    engine = WhisperEngine({model: model}, variants=[variant], default_variant=variant)
    imported = rss_mb()[0]
    engine.models.load(model)
    now, peak = rss_mb()
    return {"model": model, "variant": variant, "imports_mb": round(imported, 1), "built_mb": round(now, 1),
            "built_anon_mb": round(anonymous_mb(), 1), "peak_mb": round(peak, 1)}


def build(model: str, variant: str) -> dict:
    code = f"import json; from benchmarks.memory import _build_child; print(json.dumps(_build_child({model!r}, {variant!r})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"building {model}:{variant} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def batch_audio(seconds: int, workload: str, items: list, threads: int) -> dict:
    from benchmarks.peers import row, service
    results, memory = service({workload: items}, threads, {"MAX_BATCH_AUDIO_SECONDS": str(seconds)})
    measured = row("service", workload, items, results[workload])
    return {"max_batch_audio_seconds": seconds, **measured, **{k: round(v, 1) for k, v in memory.items() if k.endswith("_mb")}}


def main(argv: list[str] | None = None) -> None:
    # (imported here, not at the top: a build child imports this module and must not pay for them)
    from benchmarks.common import RESULTS, machine_info, write_results
    from benchmarks.peers import workload_items
    from optim.evaluation import EVAL_DIR

    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--eval-dir", type=Path, default=EVAL_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--batch-audio", default="240,120,60", help="MAX_BATCH_AUDIO_SECONDS settings (comma-separated)")
    parser.add_argument("--rounds", type=int, default=2, help="of every setting, alternating (speed varies run to run)")
    args = parser.parse_args(argv)

    builds = [build(m, v) for m, v in BUILDS]
    for b in builds:
        print(json.dumps(b), flush=True)
    workloads = workload_items(args.eval_dir)
    runs = []
    for round_ in range(args.rounds):
        for seconds in (int(s) for s in args.batch_audio.split(",")):
            for workload in WORKLOADS:
                runs.append({"round": round_ + 1, **batch_audio(seconds, workload, workloads[workload], args.threads)})
                print(json.dumps(runs[-1]), flush=True)
    result = {"machine": machine_info(), "threads": args.threads, "builds": builds, "batch_audio": runs}
    write_results(args.out, "memory", result, markdown(result))


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Memory: building a model, and a batch's working set",
        "",
        f"`python -m benchmarks.memory` on {m['cpu']} ({result['threads']} threads), torch {m['torch']}, {m['date']}. "
        "VmRSS in MB; anonymous: RssAnon, the process's own pages (VmRSS less the shared libraries' resident file pages).",
        "",
        "## Building a model in a fresh process",
        "",
        "| model:variant | after imports | built | built, anonymous | peak while building |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {b['model']}:{b['variant']} | {b['imports_mb']} | {b['built_mb']} | {b['built_anon_mb']} | {b['peak_mb']} |"
              for b in result["builds"]]
    lines += [
        "",
        "## The service (`MODELS=base`, default variant) by `MAX_BATCH_AUDIO_SECONDS`",
        "",
        "One fresh server per row: the workload's peak, RSS after ready and after the workload.",
        "",
        "| setting | workload | round | speed (audio-s/s) | WER | peak | after ready | after | after, anonymous |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(result["batch_audio"], key=lambda r: (r["workload"], -r["max_batch_audio_seconds"], r["round"])):
        wer = "–" if r["wer"] is None else f"{r['wer']} %"
        lines.append(f"| {r['max_batch_audio_seconds']} | {r['workload']} | {r['round']} | {r['rtfx']} | {wer} | {r['peak_rss_mb']} | "
                     f"{r['after_ready_mb']} | {r['after_run_mb']} | {r['after_run_anon_mb']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
