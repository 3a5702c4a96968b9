"""`python -m benchmarks.stream`: how early a streamed transcript (`stream=true`) starts, against
the same file transcribed whole, over HTTP with the official SDK.

The file: the English long-form eval files joined (LJ Speech's 237-s concatenation, then the
52-s MFA recording): 290 s of real speech, 14 windows, one upload (16-bit WAV). The server:
`python -m app` with MODELS=base, once per configuration (its defaults, and the full 30-s
encoder context, DYNAMIC_AUDIO_CONTEXT=false, where a window's words do not depend on its
batch-mates), each variant preloaded. Each request runs alone, one after another, after a
warm-up: non-streamed (`json`), then streamed. Measured on the client: the non-streamed total,
the streamed time to the first `transcript.text.delta` and to `transcript.text.done`; whether the
done text is the json text, and the WER of both against the reference. Writes
benchmarks/stream.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import os
import time
import wave
from pathlib import Path

import numpy as np
from openai import OpenAI

from benchmarks.common import RESULTS, machine_info, write_results
from loadtest.server import ServerConfig, spawn_server
from optim.accuracy import corpus_wer
from optim.audio import SAMPLE_RATE, decode_audio
from optim.evaluation import EVAL_DIR, read_manifest
from optim.registry import recommended

MODEL = "base"
FILES = ("lj-LJ001-0001-0032-concat", "mfa-michaelandsickmichael")  # the English long-form files, in this order
CONFIGS = (ServerConfig("defaults"), ServerConfig("full 30-s context", {"DYNAMIC_AUDIO_CONTEXT": "false"}))
GOAL = 0.20  # the first delta before this share of the non-streamed total


def long_file(eval_dir: Path) -> tuple[bytes, str, float]:
    """(WAV bytes, reference, seconds) of the long-form English files joined."""
    entries = {e["id"]: e for e in read_manifest(eval_dir / "longform" / "manifest.jsonl")}
    parts = [entries[i] for i in FILES]
    samples = np.concatenate([decode_audio((eval_dir / "longform" / e["audio"]).read_bytes()).samples for e in parts])
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue(), " ".join(e["text"] for e in parts), len(samples) / SAMPLE_RATE


def measure(client: OpenAI, model: str, data: bytes) -> dict:
    """One non-streamed request, then one streamed request, of the same file."""
    start = time.perf_counter()
    json_text = client.audio.transcriptions.create(model=model, file=("long.wav", data)).text
    json_seconds = time.perf_counter() - start
    start = time.perf_counter()
    deltas, done = [], None
    for event in client.audio.transcriptions.create(model=model, file=("long.wav", data), stream=True):
        if event.type == "transcript.text.delta":
            deltas.append((time.perf_counter() - start, event.delta))
        elif event.type == "transcript.text.done":
            done = event
    stream_seconds = time.perf_counter() - start
    assert done is not None and "".join(d for _, d in deltas) == done.text
    return {"json_text": json_text, "json_seconds": json_seconds, "deltas": deltas, "done_text": done.text, "stream_seconds": stream_seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stream", description=__doc__.split("\n\n")[0])
    default = str(recommended("cpu"))
    parser.add_argument(
        "--variants", default=",".join(dict.fromkeys([default, "int8+flash", "flash"])),
        help="variants of base, comma-separated (default: the CPU default, int8+flash if that is not it, and flash, "
        "the float one whose words do not depend on batch-mates with the full context)",
    )
    parser.add_argument("--eval-dir", type=Path, default=EVAL_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    data, reference, duration = long_file(args.eval_dir)
    warm_up = (args.eval_dir / "longform" / "audio" / "mfa" / "michaelandsickmichael.wav").read_bytes()
    load = os.getloadavg()
    rows = []
    for config in CONFIGS:
        log = Path("/tmp") / f"benchmark-stream-{config.name.replace(' ', '-')}.log"
        with spawn_server(MODEL, variants, config, {"LOG_LEVEL": "warning", "MAX_AUDIO_SECONDS": "3600"}, log) as server:
            client = OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", timeout=1800, max_retries=0)
            for variant in variants:
                model = f"{MODEL}:{variant}"
                measure(client, model, warm_up)  # both paths once, untimed
                m = measure(client, model, data)
                first = m["deltas"][0][0]
                rows.append({
                    "config": config.name, "model": model, "audio_seconds": round(duration, 1),
                    "json_seconds": round(m["json_seconds"], 2), "first_delta_seconds": round(first, 2),
                    "first_delta_share": round(first / m["json_seconds"], 3), "stream_seconds": round(m["stream_seconds"], 2),
                    "stream_vs_json": round(m["stream_seconds"] / m["json_seconds"], 3), "deltas": len(m["deltas"]),
                    "delta_seconds": [round(t, 2) for t, _ in m["deltas"]], "done_equals_json": m["done_text"] == m["json_text"],
                    "wer_json": round(100 * corpus_wer([reference], [m["json_text"]], "en"), 2),
                    "wer_stream": round(100 * corpus_wer([reference], [m["done_text"]], "en"), 2),
                    "json_vs_stream_wer": round(100 * corpus_wer([m["json_text"]], [m["done_text"]], "en"), 2),
                })  # fmt: skip
                print(rows[-1], flush=True)
    machine = machine_info()
    result = {"machine": machine, "load_average_at_start": [round(x, 2) for x in load], "reference_words": len(reference.split()), "rows": rows}
    lines = [
        f"`python -m benchmarks.stream` on {machine['cpu']} ({machine['threads']} threads), torch {machine['versions']['torch']}, "
        f"{machine['date']}. One run, over HTTP with the openai SDK: the English long-form files joined "
        f"({rows[0]['audio_seconds']} s, one WAV upload), each request alone after a warm-up, non-streamed `json` first, "
        f"then `stream=true`. Other work shared the machine (load average {load[0]:.1f} at the start), so the "
        f"seconds are this run's; the ratios are what to compare. Goal: the first delta before {GOAL:.0%} of the "
        "non-streamed total.",
        "",
        "| server | model:variant | non-streamed total | streamed: first delta | first delta / non-streamed | streamed: done | "
        "streamed / non-streamed | deltas | done text = json text | WER json | WER streamed | json vs streamed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['model']} | {r['json_seconds']:.2f} s | {r['first_delta_seconds']:.2f} s | "
            f"{100 * r['first_delta_share']:.1f} % | {r['stream_seconds']:.2f} s | {r['stream_vs_json']:.2f}× | {r['deltas']} | "
            f"{'yes' if r['done_equals_json'] else 'no'} | {r['wer_json']:.2f} % | {r['wer_stream']:.2f} % | {r['json_vs_stream_wer']:.2f} % |"
        )
    lines += [
        "",
        "Delta arrival times (seconds after the request): "
        + "; ".join(f"{r['config']}, {r['model']}: {', '.join(map(str, r['delta_seconds']))}" for r in rows),
        "",
        "`json vs streamed`: the WER of the streamed text against the non-streamed one (0: the same words). "
        "A streamed file's first window runs alone (so its text comes first), so the file's windows are batched "
        "differently; each row's encoder context is its own (the dynamic one included) and int8 quantizes each row's "
        "activations on their own, so a window's words do not depend on its batch-mates.",
        "",
    ]
    write_results(args.out, "stream", result, "\n".join(lines))


if __name__ == "__main__":
    main()
