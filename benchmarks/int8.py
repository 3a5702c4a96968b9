"""`python -m benchmarks.int8`: how int8 keeps fp32's words, measured in one run.

Per set (en_read, en_hard, the English longform files), through the service's own engine and
scheduler, all clips of a set submitted at once, greedy with temperature fallback:

* accuracy and speed in the service's configuration (batched, dynamic audio context): WER, its
  change against `fp32`, RTFx and its ratio to `fp32`'s;
* accuracy with the 30-s context, batched: there a window's words do not depend on when the
  clips arrived or what shares their batch, so this WER repeats exactly from run to run and is
  the one to compare variants by. In the service's configuration the dynamic context follows
  the batch's longest window, and batches form by arrival time, so a set's WER moves between
  runs by a few words (on en_hard, 1 word is 0.38 points);
* batch invariance of each int8 variant, with the 30-s context: the WER of the batched
  transcripts against the one-at-a-time ones; 0 = the same words.

The variants: `fp32`, the reference; `flash`, the exact default (how far float rounding alone
moves the words); `int8+flash`, the served int8 with one activation scale per row and 8-bit
activations on a VNNI CPU (optim/variants/int8.py); two baselines registered here only:
`int8p1+flash`, the same with one pass in the decoder too (the served int8 before its decoder went to
two passes), `int8r7+flash`, the served one with 7-bit activations (what a CPU without VNNI gets),
and `int8pt+flash`, the first int8 (fbgemm's dynamic linear, one activation scale per call).

Writes benchmarks/int8.{json,md}.

`--shifts K` measures instead how far an inaudible change moves each variant's words: every clip
of a set is transcribed again K times, delayed by 1..K samples (62.5 µs each: zeros prepended),
with the 30-s context. fp32's words barely move; a quantized variant's rounding can tip a hard
clip into a different reading (or a repetition loop) and back. One run's Δ WER is then a single
draw: the mean over the shifts, and the paired difference against fp32 with its standard error,
is the figure to judge a variant by. Writes benchmarks/int8_shifts.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from whisper.model import Whisper

from benchmarks.common import RESULTS, machine_info, write_results
from optim import registry
from optim.accuracy import corpus_wer
from optim.engine import WhisperEngine
from optim.evaluation import EVAL_DIR, audio_seconds, load_set, transcribe_set
from optim.scheduler import SchedulerConfig
from optim.variants.int8 import Int8Embedding, Int8Linear, TwoPassInt8Linear, apply_int8
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


PER_TENSOR = Technique("int8pt", apply_int8_per_tensor, stage=2, group="precision", devices=("cpu",), own_weights=True)


def apply_int8_7bit(model: Whisper) -> Whisper:
    """The served int8 with 7-bit activations, as on a CPU without VNNI."""
    model = apply_int8(model)
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.qparams = (2 / 127, 64)  # [-1, 1] onto 0..127: fbgemm's reduce_range
    return model


SEVEN_BIT = Technique("int8r7", apply_int8_7bit, stage=2, group="precision", devices=("cpu",), own_weights=True)


def apply_int8_one_pass(model: Whisper) -> Whisper:
    """The served int8 as it was before its decoder went to two passes: one pass everywhere."""
    model = apply_int8(model)
    for module in model.modules():
        if type(module) is TwoPassInt8Linear:
            module.__class__ = Int8Linear
    return model


ONE_PASS = Technique("int8p1", apply_int8_one_pass, stage=2, group="precision", devices=("cpu",), own_weights=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int8", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="base")
    parser.add_argument("--sets", default="en_read,en_hard,longform")
    parser.add_argument("--variants", default="fp32,flash,int8+flash,int8p1+flash,int8r7+flash,int8pt+flash")
    parser.add_argument("--eval-dir", type=Path, default=EVAL_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--shifts", type=int, default=0, help="instead: WER of each set delayed by 0..K samples (module doc)")
    args = parser.parse_args(argv)
    registry.register(PER_TENSOR)
    registry.register(SEVEN_BIT)
    registry.register(ONE_PASS)
    names = args.variants.split(",")
    engine = WhisperEngine({args.model: args.model}, variants=names, default_variant=names[0])
    if args.shifts:
        return shifted(engine, args)
    rows = []
    for set_name in args.sets.split(","):
        clips = load_set(set_name, args.eval_dir)
        for name in args.variants.split(","):
            ref = engine.models.ref(args.model, engine.models.variant(name))
            row = {"model": args.model, "variant": str(ref.variant), "set": set_name, "clips": len(clips),
                   "audio_seconds": round(audio_seconds(clips), 1)}
            references = [c.text for c in clips]
            texts, seconds = transcribe_set(engine, ref, SERVICE, clips)
            row["wer"] = round(100 * corpus_wer(references, texts), 2)
            row["rtfx"] = round(audio_seconds(clips) / seconds, 2)
            together, _ = transcribe_set(engine, ref, BATCHED_30S, clips)
            row["wer_30s"] = round(100 * corpus_wer(references, together), 2)
            if ref.variant.own_weights:  # fp32 and flash are batch-invariant (tests/test_batching.py)
                alone, _ = transcribe_set(engine, ref, ALONE_30S, clips)
                row["batched_vs_alone_wer"] = round(100 * corpus_wer(alone, together), 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    engine.close()
    result = {"machine": machine_info(), "rows": rows}
    write_results(args.out, "int8", result, markdown(result))


def delayed(clips: list, samples: int) -> list:
    """The clips, each starting `samples` samples later (zeros first): the same sound to a listener."""
    return [dataclasses.replace(c, samples=np.concatenate([np.zeros(samples, np.float32), c.samples])) for c in clips]


def shifted(engine: WhisperEngine, args: argparse.Namespace) -> None:
    rows = []
    for set_name in args.sets.split(","):
        clips = load_set(set_name, args.eval_dir)
        references = [c.text for c in clips]
        for name in args.variants.split(","):
            ref = engine.models.ref(args.model, engine.models.variant(name))
            wers = [round(100 * corpus_wer(references, transcribe_set(engine, ref, BATCHED_30S, delayed(clips, k))[0]), 2)
                    for k in range(args.shifts + 1)]
            rows.append({"model": args.model, "variant": str(ref.variant), "set": set_name, "clips": len(clips),
                         "audio_seconds": round(audio_seconds(clips), 1), "wer_by_shift": wers})
            print(json.dumps(rows[-1]), flush=True)
    engine.close()
    result = {"machine": machine_info(), "shifts": args.shifts, "rows": rows}
    write_results(args.out, "int8_shifts", result, shifts_markdown(result))


def shifts_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# How far an inaudible change moves the words: each set delayed by 0..K samples",
        "",
        f"`python -m benchmarks.int8 --shifts {result['shifts']} ...` on {m['cpu']} ({m['threads']} threads), torch {m['torch']}, {m['date']}.",
        "Every clip delayed by k samples (62.5 µs each), batched with the 30-s context (repeatable), WER after Whisper's",
        "English normalizer. Δ: the mean of the paired differences against fp32 over the shifts, ± its standard error.",
        "",
        f"| set | variant | WER at shifts 0..{result['shifts']} (%) | mean | spread (sd) | Δ mean vs fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        base = next(x for x in result["rows"] if x["set"] == r["set"] and x["variant"] == "fp32")["wer_by_shift"]
        diffs = [a - b for a, b in zip(r["wer_by_shift"], base)]
        se = statistics.stdev(diffs) / len(diffs) ** 0.5
        lines.append(
            f"| {r['set']} ({r['clips']} clips, {r['audio_seconds']} s) | {r['variant']} | {', '.join(map(str, r['wer_by_shift']))} | "
            f"{statistics.mean(r['wer_by_shift']):.2f} | {statistics.stdev(r['wer_by_shift']):.2f} | "
            f"{statistics.mean(diffs):+.2f} ± {se:.2f} |"
        )
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# int8 against fp32: per-row activation scales (two-pass decoder, one pass, 7-bit) against per-tensor",
        "",
        f"`python -m benchmarks.int8` on {m['cpu']} ({m['threads']} threads, {', '.join(m['isa'])}), torch {m['torch']}, {m['date']}.",
        "The service's engine and scheduler, every clip of a set submitted at once, greedy with temperature fallback,",
        "WER after Whisper's English normalizer. `30-s context`: batched with the full context, where the words do not",
        "depend on batch-mates or arrival times (repeatable; compare variants by it). `service config`: batched with the",
        "dynamic audio context, as served (its WER moves between runs by a few words). `batched vs alone`: the WER of the",
        "batched 30-s transcripts against the one-at-a-time ones; 0 means the same words whatever shares a batch.",
        "",
        "| set | variant | WER, 30-s context | Δ vs fp32 | WER, service config | Δ vs fp32 | RTFx, service config | × fp32 | batched vs alone |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        base = next(x for x in result["rows"] if x["set"] == r["set"] and x["variant"] == "fp32")
        lines.append(
            f"| {r['set']} ({r['clips']} clips, {r['audio_seconds']} s) | {r['variant']} | {r['wer_30s']} % | "
            f"{r['wer_30s'] - base['wer_30s']:+.2f} | {r['wer']} % | {r['wer'] - base['wer']:+.2f} | {r['rtfx']} | "
            f"{r['rtfx'] / base['rtfx']:.2f}× | {_cell(r, 'batched_vs_alone_wer', ' %')} |"
        )
    return "\n".join(lines) + "\n"


def _cell(row: dict, key: str, unit: str = "") -> str:
    return f"{row[key]}{unit}" if key in row else "–"


if __name__ == "__main__":
    main()
