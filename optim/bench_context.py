"""`python -m optim.bench_context`: what batching and the dynamic audio context do to accuracy
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
import asyncio
import json
import platform
import time
from pathlib import Path

import torch
from jiwer import wer
from whisper.normalizers import EnglishTextNormalizer

from app.audio import decode_audio
from app.scheduler import Scheduler, SchedulerConfig
from optim.bench import machine_info
from optim.engine import TranscriptionOptions, WhisperEngine

EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "eval"
CONFIGS = {
    "unbatched": SchedulerConfig(max_batch_size=1, shorten_context=False),
    "batched": SchedulerConfig(max_batch_size=8, shorten_context=False),
    "batched+dynamic": SchedulerConfig(max_batch_size=8, shorten_context=True),
}
normalize = EnglishTextNormalizer()


def load_set(name: str, eval_dir: Path) -> list[tuple[str, object, float]]:
    folder = eval_dir / name
    items = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    return [(i["text"], decode_audio((folder / i["audio"]).read_bytes()).samples, i["duration_s"]) for i in items if i["lang"] == "en"]


async def run(engine: WhisperEngine, model: str, variant: str, config: SchedulerConfig, clips) -> tuple[list[str], float]:
    scheduler = Scheduler(engine, config)
    options = TranscriptionOptions(language="en")
    try:
        await scheduler.transcribe(model, variant, clips[0][1], options)  # builds the variant, warms up
        start = time.perf_counter()
        results = await asyncio.gather(*(scheduler.transcribe(model, variant, audio, options) for _, audio, _ in clips))
        return [r.text for r in results], time.perf_counter() - start
    finally:
        await scheduler.close()


def measure(engine: WhisperEngine, model: str, variant: str, config: SchedulerConfig, clips) -> dict[str, float]:
    """WER % (after Whisper's English normalizer) and RTFx of one model:variant on a set's clips,
    all submitted at once, the fallback sampling seeded."""
    torch.manual_seed(0)  # temperature fallback samples
    texts, seconds = asyncio.run(run(engine, model, variant, config, clips))
    refs = [normalize(ref) for ref, _, _ in clips]
    audio_seconds = sum(len(a) for _, a, _ in clips) / 16_000
    return {
        "wer": round(100 * wer(refs, [normalize(t) or "<empty>" for t in texts]), 2),
        "rtfx": round(audio_seconds / seconds, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="base:flash,base:int8+flash,tiny.en:flash", help="model:variant pairs")
    parser.add_argument("--sets", default="en_read,en_hard,longform")
    parser.add_argument("--eval-dir", type=Path, default=EVAL)
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    args = parser.parse_args(argv)
    sets = {name: load_set(name, args.eval_dir) for name in args.sets.split(",")}
    rows = []
    for pair in args.runs.split(","):
        model, variant = pair.split(":")
        engine = WhisperEngine({model: model})
        engine.load(model)
        for set_name, clips in sets.items():
            audio_seconds = sum(len(a) for _, a, _ in clips) / 16_000
            for config_name, config in CONFIGS.items():
                row = {
                    "model": model,
                    "variant": variant,
                    "set": set_name,
                    "config": config_name,
                    "clips": len(clips),
                    "audio_seconds": round(audio_seconds, 1),
                    **measure(engine, model, variant, config, clips),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
        engine.close()
    described = machine_info()
    machine = {"platform": platform.platform(), "processor": described["cpu"], "threads": torch.get_num_threads(), "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "context.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    (args.out / "context.md").write_text(_markdown(rows, machine))


def _markdown(rows: list[dict], machine: dict) -> str:
    lines = [
        "# Batching and the dynamic audio context: accuracy and speed",
        "",
        f"`python -m optim.bench_context` on {machine['processor']} ({machine['threads']} threads), torch {machine['torch']}.",
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
