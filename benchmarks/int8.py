"""`python -m benchmarks.int8`: how int8 keeps fp32's words, measured in one run.

Per set (en_read, en_hard, the English longform files), through the service's own engine and
scheduler, all clips of a set submitted at once, greedy with temperature fallback:

* accuracy and speed in the service's configuration (batched, dynamic audio context): WER, its
  change against `fp32`, RTFx and its ratio to `fp32`'s;
* batch invariance of each int8 variant, with the 30-s context (the dynamic context's length
  follows the batch's longest window, so only there do batch-mates change a window's input):
  the WER of the batched transcripts against the one-at-a-time ones; 0 = the same words.

The variants: `fp32`, the reference; `int8+flash`, the served int8 with one activation scale
per row (optim/variants/int8.py); `int8pt+flash`, the previous int8 (fbgemm's dynamic linear,
one activation scale per call), registered here as a baseline only.

Writes benchmarks/int8.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
from torch import nn
from whisper.model import Whisper

from benchmarks.common import RESULTS, machine_info
from optim import registry
from optim.accuracy import corpus_wer
from optim.engine import WhisperEngine
from optim.evaluation import EVAL_DIR, audio_seconds, load_set, transcribe_set
from optim.scheduler import SchedulerConfig
from optim.variants.int8 import Int8Embedding
from optim.variants.modules import use_variant_decoder
from optim.variants.technique import Technique

SERVICE = SchedulerConfig(max_batch_size=8, shorten_context=True)  # the service's defaults
ALONE_30S = SchedulerConfig(max_batch_size=1, shorten_context=False)
BATCHED_30S = SchedulerConfig(max_batch_size=8, shorten_context=False)


def apply_int8_per_tensor(model: Whisper) -> Whisper:
    """The int8 variant as it was: torch.ao's dynamic quantization, one activation scale per call."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    decoder = use_variant_decoder(model)
    embedding = decoder.token_embedding.weight.detach()
    with torch.device("meta"):
        output = nn.Linear(embedding.shape[1], embedding.shape[0], bias=False)
    output.weight = nn.Parameter(embedding, requires_grad=False)
    decoder.output_projection = output
    for module in model.modules():
        if isinstance(module, nn.Linear) and type(module) is not nn.Linear:
            module.__class__ = nn.Linear  # quantize_dynamic matches exact types
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    decoder.token_embedding = Int8Embedding(embedding)
    return model


PER_TENSOR = Technique("int8pt", apply_int8_per_tensor, stage=2, group="precision", devices=("cpu",))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int8", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="base")
    parser.add_argument("--sets", default="en_read,en_hard,longform")
    parser.add_argument("--variants", default="fp32,int8+flash,int8pt+flash")
    parser.add_argument("--eval-dir", type=Path, default=EVAL_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    registry.register(PER_TENSOR)
    names = args.variants.split(",")
    engine = WhisperEngine({args.model: args.model}, variants=names, default_variant=names[0])
    rows = []
    for set_name in args.sets.split(","):
        clips = load_set(set_name, args.eval_dir)
        for name in args.variants.split(","):
            ref = engine.models.ref(args.model, engine.models.variant(name))
            row = {"model": args.model, "variant": str(ref.variant), "set": set_name, "clips": len(clips),
                   "audio_seconds": round(audio_seconds(clips), 1)}
            texts, seconds = transcribe_set(engine, ref, SERVICE, clips)
            row["wer"] = round(100 * corpus_wer([c.text for c in clips], texts), 2)
            row["rtfx"] = round(audio_seconds(clips) / seconds, 2)
            if ref.variant.name != "fp32":  # fp32 is batch-invariant (tests/test_batching.py)
                alone, _ = transcribe_set(engine, ref, ALONE_30S, clips)
                together, _ = transcribe_set(engine, ref, BATCHED_30S, clips)
                row["batched_vs_alone_wer"] = round(100 * corpus_wer(alone, together), 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    engine.close()
    result = {"machine": machine_info(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int8.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "int8.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# int8 against fp32: per-row against per-tensor activation scales",
        "",
        f"`python -m benchmarks.int8` on {m['cpu']} ({m['threads']} threads, {', '.join(m['isa'])}), torch {m['torch']}, {m['date']}.",
        "The service's engine and scheduler, every clip of a set submitted at once, greedy with temperature fallback,",
        "WER after Whisper's English normalizer. WER and RTFx in the service's configuration (batched, dynamic audio",
        "context). `batched vs alone`: the WER of the batched transcripts against the one-at-a-time ones with the 30-s",
        "context; 0 means the same words whatever shares a batch.",
        "",
        "| set | variant | WER | Δ WER vs fp32 | RTFx | × fp32 | batched vs alone |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        base = next(x for x in result["rows"] if x["set"] == r["set"] and x["variant"] == "fp32")
        lines.append(
            f"| {r['set']} ({r['clips']} clips, {r['audio_seconds']} s) | {r['variant']} | {r['wer']} % | "
            f"{r['wer'] - base['wer']:+.2f} | {r['rtfx']} | {r['rtfx'] / base['rtfx']:.2f}× | {_cell(r, 'batched_vs_alone_wer', ' %')} |"
        )
    return "\n".join(lines) + "\n"


def _cell(row: dict, key: str, unit: str = "") -> str:
    return f"{row[key]}{unit}" if key in row else "–"


if __name__ == "__main__":
    main()
