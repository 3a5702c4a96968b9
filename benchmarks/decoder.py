"""`python -m benchmarks.decoder`: the service's batch-1 decoder against openai-whisper's own
loop, on the same built variant and the same clips, one clip at a time, in one run.

For each variant (`flash`, `int8+flash` by default) of one model (`base`), over the first
`--clips` clips of en_read:

* `transcribe()`: openai-whisper's `whisper.transcribe` on the variant's model (fp16=False, its
  temperature fallback), the audio already decoded;
* every run with `language="en"`: without it transcribe() runs the encoder a second time to
  detect the language, which is not the decoding loop this compares;
* `engine 30 s`: the service's engine and scheduler with batches of one and the 30-s encoder
  context, as transcribe() encodes: the same work, so the difference is the decoding loop;
* `engine dynamic`: the same with the dynamic context (the service's default).

Each figure is the compute seconds summed over the clips (a warm-up clip first), with WER and
RTFx, and the cost per token beyond the encoder ((total − encoder seconds) / tokens). Then the
decoder step alone, 100 greedy steps with the encoder output ready: ours (`decoder_hidden` +
`logits`, static cache) and openai-whisper's (`model.decoder` with its key/value hooks).

Writes benchmarks/decoder.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import torch
import whisper

from benchmarks.common import (
    RESULTS,
    decoder_seconds_per_token,
    machine_info,
    write_results,
)
from optim.accuracy import corpus_wer
from optim.decoding import encode
from optim.engine import WhisperEngine
from optim.evaluation import EVAL_DIR, audio_seconds, load_set
from optim.scheduler import Scheduler, SchedulerConfig
from optim.types import TranscriptionOptions

ALONE = {
    "engine 30 s": SchedulerConfig(max_batch_size=1, max_wait=0.0, shorten_context=False),
    "engine dynamic": SchedulerConfig(max_batch_size=1, max_wait=0.0, shorten_context=True),
}


def _encoder_seconds(model, frames: int, repeats: int = 3) -> float:
    with torch.inference_mode():
        mel = torch.zeros(1, model.dims.n_mels, frames)
        encode(model, mel)
        start = time.perf_counter()
        for _ in range(repeats):
            encode(model, mel)
    return (time.perf_counter() - start) / repeats


def whisper_seconds_per_token(model, steps: int = 100) -> float:
    """openai-whisper's decoder step: `model.decoder` on one new token, with its kv-cache hooks."""
    with torch.inference_mode():
        audio = model.encoder(torch.zeros(1, model.dims.n_mels, 3000))
        for timed in (False, True):
            cache, hooks = model.install_kv_cache_hooks()
            start = time.perf_counter()
            tokens = torch.tensor([[50257]])
            for _ in range(steps):
                tokens = model.decoder(tokens, audio, kv_cache=cache)[:, -1:].argmax(-1)
            elapsed = time.perf_counter() - start
            for hook in hooks:
                hook.remove()
            if timed:
                return elapsed / steps
    raise AssertionError("unreachable")


def run_transcribe(model, clips) -> tuple[list[str], float, int]:
    texts, seconds, tokens = [], 0.0, 0
    whisper.transcribe(model, torch.from_numpy(clips[0].samples), fp16=False, verbose=None, language="en")  # warm-up
    for clip in clips:
        start = time.perf_counter()
        result = whisper.transcribe(model, torch.from_numpy(clip.samples), fp16=False, verbose=None, language="en")
        seconds += time.perf_counter() - start
        texts.append(result["text"])
        tokens += sum(len(s["tokens"]) for s in result["segments"]) + len(result["segments"])  # + each end-of-text
    return texts, seconds, tokens


def run_engine(engine: WhisperEngine, ref, config: SchedulerConfig, clips) -> tuple[list[str], float, int, float]:
    async def go():
        scheduler = Scheduler(engine, config)
        steps, contexts = [], []
        scheduler.on_batch = lambda _ref, stats, _seconds: (steps.append(sum(stats.decoder_steps)), contexts.extend(stats.encoder_frames))
        await scheduler.transcribe(ref, clips[0].samples, TranscriptionOptions(language="en"))  # warm-up
        steps.clear(), contexts.clear()
        texts, seconds = [], 0.0
        for clip in clips:
            start = time.perf_counter()
            transcript, _ = await scheduler.transcribe(ref, clip.samples, TranscriptionOptions(language="en"))
            seconds += time.perf_counter() - start
            texts.append(transcript.text)
        await scheduler.close()
        return texts, seconds, sum(steps), contexts

    texts, seconds, tokens, contexts = asyncio.run(go())
    model = engine.models.built(ref).model
    encoder = sum(_encoder_seconds(model, frames) for frames in contexts)
    return texts, seconds, tokens, encoder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decoder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="base")
    parser.add_argument("--variants", default="flash,int8+flash")
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--eval-dir", type=Path, default=EVAL_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    clips = load_set("en_read", args.eval_dir)[: args.clips]
    seconds_of_audio = audio_seconds(clips)
    references = [c.text for c in clips]
    names = args.variants.split(",")
    engine = WhisperEngine({args.model: args.model}, variants=names, default_variant=names[0])
    rows = []
    try:
        for name in names:
            ref = engine.models.ref(args.model, engine.models.variant(name))
            model = engine.models.built(ref).model
            encoder_30s = _encoder_seconds(model, 3000)
            texts, seconds, tokens = run_transcribe(model, clips)
            runs = {"transcribe()": (texts, seconds, tokens, encoder_30s * len(clips))}
            for label, config in ALONE.items():
                runs[label] = run_engine(engine, ref, config, clips)
            for label, (texts, seconds, tokens, encoder) in runs.items():
                row = {
                    "variant": name, "loop": label, "compute_seconds": round(seconds, 3),
                    "rtfx": round(seconds_of_audio / seconds, 2), "wer": round(100 * corpus_wer(references, texts), 2),
                    "tokens": tokens, "encoder_seconds": round(encoder, 3),
                    "ms_per_token_beyond_encoder": round(1000 * (seconds - encoder) / tokens, 2),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            steps = {"ours": decoder_seconds_per_token(model, ref.variant), "openai-whisper": whisper_seconds_per_token(model)}
            rows.append({"variant": name, "loop": "decoder step", **{f"{k}_ms": round(1000 * v, 3) for k, v in steps.items()}})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        engine.close()
    result = {"machine": machine_info(), "model": args.model, "clips": len(clips), "audio_seconds": round(seconds_of_audio, 1), "rows": rows}
    write_results(args.out, "decoder", result, markdown(result))


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# The batch-1 decoder against openai-whisper's loop",
        "",
        f"`python -m benchmarks.decoder` on {m['cpu']} ({m['threads']} threads), torch {m['torch']}, {m['date']}: "
        f"`{result['model']}`, {result['clips']} en_read clips ({result['audio_seconds']} s) one at a time, the same built "
        "variant in every row. Per token: (compute − encoder seconds) / tokens decoded.",
        "",
        "| variant | loop | compute (s) | RTFx | WER | tokens | encoder (s) | ms per token beyond the encoder | × transcribe() |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r["loop"] == "decoder step":
            continue
        anchor = next(x for x in result["rows"] if x["variant"] == r["variant"] and x["loop"] == "transcribe()")
        lines.append(
            f"| {r['variant']} | {r['loop']} | {r['compute_seconds']} | {r['rtfx']} | {r['wer']} % | {r['tokens']} | "
            f"{r['encoder_seconds']} | {r['ms_per_token_beyond_encoder']} | {anchor['compute_seconds'] / r['compute_seconds']:.2f}× |"
        )
    lines += ["", "Decoder step alone (batch of one, 30-s context, 100 greedy steps, ms):", "",
              "| variant | ours | openai-whisper |", "|---|---|---|"]
    for r in result["rows"]:
        if r["loop"] == "decoder step":
            lines.append(f"| {r['variant']} | {r['ours_ms']} | {r['openai-whisper_ms']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
