"""`python -m benchmarks.context`: what batching and the dynamic audio context do to accuracy
and speed, on the eval sets, through the service's own engine and scheduler.

For each model and variant, every clip of a set is submitted at once (the scheduler batches
them), in three configurations measured in one run:

* `unbatched`: batch size 1, 30-s encoder context (openai-whisper's computation, window by window);
* `batched`: batch size 8, 30-s context;
* `batched+dynamic`: batch size 8, encoder over the batch's longest window (≥15 s).

English sets only (`en_read`, `en_hard`, the English `longform` files), WER after Whisper's
English normalizer. Writes benchmarks/context.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import RESULTS, machine_info
from optim.engine import WhisperEngine
from optim.evaluation import EVAL_DIR, audio_seconds, load_set, measure
from optim.scheduler import SchedulerConfig

CONFIGS = {
    "unbatched": SchedulerConfig(max_batch_size=1, shorten_context=False),
    "batched": SchedulerConfig(max_batch_size=8, shorten_context=False),
    "batched+dynamic": SchedulerConfig(max_batch_size=8, shorten_context=True),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="base:flash,base:int8+flash,tiny.en:flash", help="model:variant pairs")
    parser.add_argument("--sets", default="en_read,en_hard,longform")
    parser.add_argument("--eval-dir", type=Path, default=EVAL_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sets = {name: load_set(name, args.eval_dir) for name in args.sets.split(",")}
    rows = []
    for pair in args.runs.split(","):
        model, variant = pair.split(":")
        engine = WhisperEngine({model: model})
        ref = engine.models.ref(model, engine.models.variant(variant))
        for set_name, clips in sets.items():
            for config_name, config in CONFIGS.items():
                row = {
                    "model": model,
                    "variant": variant,
                    "set": set_name,
                    "config": config_name,
                    "clips": len(clips),
                    "audio_seconds": round(audio_seconds(clips), 1),
                    **measure(engine, ref, config, clips),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
        engine.close()
    machine = machine_info()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "context.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    (args.out / "context.md").write_text(_markdown(rows, machine))


def _markdown(rows: list[dict], machine: dict) -> str:
    lines = [
        "# Batching and the dynamic audio context: accuracy and speed",
        "",
        f"`python -m benchmarks.context` on {machine['cpu']} ({machine['threads']} threads), torch {machine['torch']}.",
        "All clips of a set submitted at once; greedy with temperature fallback; WER after Whisper's English normalizer.",
        "",
        "| model:variant | set | clips | audio s | unbatched WER | batched WER | batched+dynamic WER | unbatched RTFx | batched RTFx | batched+dynamic RTFx |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, dict] = {}
    for r in rows:
        groups.setdefault((r["model"], r["variant"], r["set"]), {})[r["config"]] = r
    for (model, variant, set_name), by in groups.items():
        first = next(iter(by.values()))
        wers = " | ".join(f"{by[c]['wer']:.2f} %" for c in CONFIGS)
        speeds = " | ".join(f"{by[c]['rtfx']:.1f}" for c in CONFIGS)
        lines.append(f"| {model}:{variant} | {set_name} | {first['clips']} | {first['audio_seconds']} | {wers} | {speeds} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
