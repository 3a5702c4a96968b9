"""`python -m benchmarks.distill`: distilled students against their teachers, in one run.

Per teacher (a student must exist: `python -m optim.distill --teacher T`) and variant (the
teacher's and the student's, alone and with flash / int8+flash): WER and RTFx on en_read through
the service's engine and scheduler (batched, dynamic context: the service's defaults), and the
decoder's time per token (batch of one, 30-s encoder context, 100 greedy steps after a warm-up),
with the student's training time and data from its checkpoint. Writes benchmarks/distill.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import (
    RESULTS,
    decoder_seconds_per_token,
    machine_info,
    write_results,
)
from benchmarks.context import CONFIGS
from optim.engine import WhisperEngine
from optim.evaluation import EVAL_DIR, audio_seconds, load_set, measure
from optim.registry import build_variant
from optim.student import load_student, student_path

VARIANTS = ("fp32", "flash", "int8+flash", "distilled", "distilled+flash", "distilled+int8+flash")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--teachers", default="tiny.en,base")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--eval-dir", type=Path, default=EVAL_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    clips = load_set("en_read", args.eval_dir)
    seconds = audio_seconds(clips)
    rows, students = [], {}
    for teacher in args.teachers.split(","):
        path = student_path(args.models_dir, teacher)
        if not path.is_file():
            raise SystemExit(f"no student of {teacher} at {path}: python -m optim.distill --teacher {teacher}")
        students[teacher] = {k: v for k, v in load_student(path)[1].items() if k in ("layers", "teacher_layers", "data", "training", "total_seconds", "config")}
        students[teacher]["training"]["history"] = [  # the curve, without per-epoch timing
            {k: v for k, v in h.items() if k in ("epoch", "loss", "val_loss")} for h in students[teacher]["training"]["history"]
        ]
        engine = WhisperEngine({teacher: teacher}, models_dir=args.models_dir)
        try:
            for name in args.variants.split(","):
                ref = engine.models.ref(teacher, engine.models.variant(name))
                figures = measure(engine, ref, CONFIGS["batched+dynamic"], clips)
                model = build_variant(engine.models.source(ref), ref.variant)
                row = {
                    "model": teacher,
                    "variant": str(ref.variant),
                    **figures,
                    "decoder_ms_per_token": round(1000 * decoder_seconds_per_token(model, ref.variant), 2),
                    "decoder_layers": model.dims.n_text_layer,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            engine.close()
    result = {"machine": machine_info(), "set": {"name": "en_read", "clips": len(clips), "audio_seconds": round(seconds, 1)},
              "rows": rows, "students": students}
    write_results(args.out, "distill", result, markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = [
        "# Distilled students against their teachers",
        "",
        f"Machine: {result['machine']['cpu']}. en_read: {result['set']['clips']} clips, {result['set']['audio_seconds']} s; "
        "batched with the dynamic audio context (the service's defaults), greedy with temperature fallback, "
        "WER after Whisper's English normalizer. Decoder time: batch of one, 30-s context, 100 greedy steps.",
        "",
        "| model | variant | decoder layers | WER % | RTFx | decoder ms/token | RTFx vs fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        base = next(x for x in result["rows"] if x["model"] == r["model"] and x["variant"] == "fp32")
        lines.append(f"| {r['model']} | {r['variant']} | {r['decoder_layers']} | {r['wer']} | {r['rtfx']} | "
                     f"{r['decoder_ms_per_token']} | {r['rtfx'] / base['rtfx']:.2f}× |")
    lines += ["", "| student | layers kept | training audio (kept / cut) | windows (train / validation) | labelling + encoding | training | best epoch | validation loss (epoch 1 → best) |",
              "|---|---|---|---|---|---|---|---|"]
    for teacher, s in result["students"].items():
        d, t = s["data"], s["training"]
        history = t["history"]
        lines.append(f"| {teacher} | {s['layers']} of {s['teacher_layers']} | {d['audio_seconds_kept'] / 60:.1f} / {d['audio_seconds'] / 60:.1f} min | "
                     f"{d['train_windows']} / {d['validation_windows']} | {d['label_seconds'] + d['encode_seconds']:.0f} s | "
                     f"{t['train_seconds']:.0f} s | {t['best_epoch']} of {s['config']['epochs']} | {history[0]['val_loss']} → {t['best_val_loss']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
