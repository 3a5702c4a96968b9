"""`python -m benchmarks.ray_serve`: the plain server against Ray Serve, one workload.

Three configurations on this machine, the same workload (loadtest's: mixed clips drawn from
../shared/eval, the model's default variant):
  plain   `python -m app` with one lane of 2 torch threads (BATCH_LANES=1, TORCH_THREADS=2: as
          `make serve` ran before lanes; its default now is 2 lanes of 1 thread);
  ray-1x2 Ray Serve, 1 model replica × 2 torch threads (SERVE_REPLICA_CPUS=2);
  ray-2x1 Ray Serve, 2 model replicas × 1 torch thread each.
Each is measured at every concurrency (closed loop, each request once): latency at 1 client
(Ray's per-request overhead is the difference to `plain`), throughput at 16 clients, and the
mean batch size (from the /metrics of every process that batches: for Ray, each model replica's,
found through GET /metrics/targets). Writes benchmarks/ray_serve.{json,md}, with a capacity model.

Ray runs on a throw-away local cluster (app/ray/local.py) with all the machine's CPUs; only the
processes it starts are killed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx

from app.ray.local import ROOT, LocalCluster, free_port
from benchmarks.common import machine_info, write_results
from loadtest import client
from loadtest.runner import summarize
from loadtest.server import stop, wait_until_ready
from loadtest.workload import DEFAULT_EVAL_DIR, build_workload

CONFIGS = {  # name -> (Ray?, settings)
    "plain": (False, {"BATCH_LANES": "1", "TORCH_THREADS": "2"}),
    "ray-1x2": (True, {"SERVE_MIN_REPLICAS": "1", "SERVE_MAX_REPLICAS": "1", "SERVE_REPLICA_CPUS": "1.9", "BATCH_LANES": "1", "TORCH_THREADS": "2"}),
    "ray-2x1": (True, {"SERVE_MIN_REPLICAS": "2", "SERVE_MAX_REPLICAS": "2", "SERVE_REPLICA_CPUS": "0.9", "BATCH_LANES": "1", "TORCH_THREADS": "1"}),
}


def _batch_totals(texts: list[str]) -> tuple[float, float]:
    """(sum, count) of whisper_batch_size over these expositions."""
    totals = []
    for name in ("whisper_batch_size_sum", "whisper_batch_size_count"):
        pattern = re.compile(rf"^{name}(?:{{[^}}]*}})? (\S+)$", re.M)
        totals.append(sum(float(v) for text in texts for v in pattern.findall(text)))
    return totals[0], totals[1]


async def _batch_texts(http: httpx.AsyncClient, ray: bool) -> list[str]:
    if not ray:
        return [await client.scrape_metrics(http) or ""]
    targets = (await http.get("/metrics/targets")).json()
    urls = [f"http://{t['targets'][0]}/metrics" for t in targets if t["labels"]["deployment"] != "ingress"]
    return [(await http.get(url)).text for url in urls]


async def _measure(url: str, ray: bool, workload, model: str, concurrencies: list[int]) -> list[dict]:
    records = []
    async with client.new_client(url, max(concurrencies)) as http:
        await client.warm_up(http, sorted(workload.items, key=lambda i: i.duration)[:2], model)
        for concurrency in concurrencies:
            before = _batch_totals(await _batch_texts(http, ray))
            outcome = await client.run_closed_loop(http, workload.items, model, concurrency)
            after = _batch_totals(await _batch_texts(http, ray))
            batches = after[1] - before[1]
            mean_batch = (after[0] - before[0]) / batches if batches else None
            record = summarize(outcome, workload, {"mean_batch_size": mean_batch})
            record.pop("requests")
            record.pop("transcripts")
            records.append({"concurrency": concurrency, **record})
            print(f"  × {concurrency}: {record['audio_s_per_s']:.2f} audio s/s, p50 {record['latency_s']['p50']:.2f} s, "
                  f"batch {mean_batch}, errors {record['errors']}", flush=True)
    return records


def _run_plain(settings: dict, model: str, workload, concurrencies: list[int], log: Path) -> list[dict]:
    port = free_port()
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "MODELS": model, "DEFAULT_MODEL": model, "LOG_LEVEL": "warning", **settings}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, process, log)
        return asyncio.run(_measure(url, False, workload, model, concurrencies))
    finally:
        stop(process)


def _run_ray(settings: dict, model: str, workload, concurrencies: list[int]) -> list[dict]:
    cluster = LocalCluster(nodes=1, cpus_per_node=os.cpu_count() or 2)
    try:
        cluster.start()
        url = cluster.serve(MODELS=model, DEFAULT_MODEL=model, LOG_LEVEL="warning", **settings)
        return asyncio.run(_measure(url, True, workload, model, concurrencies))
    finally:
        left = cluster.stop()
        if left:
            print(f"WARNING: Ray processes left running: {sorted(left)}", file=sys.stderr)


def _at(records: list[dict], concurrency: int) -> dict | None:
    return next((r for r in records if r["concurrency"] == concurrency), None)


def report(result: dict) -> str:
    runs, low, high = result["runs"], min(result["concurrencies"]), max(result["concurrencies"])
    plain_low = _at(runs.get("plain", []), low)
    lines = [
        "# Ray Serve against the plain server",
        "",
        f"Workload: {result['workload']['count']} requests of `{result['model']}` (default variant), "
        f"{result['workload']['audio_seconds']:.0f} s of audio, mixed clips from ../shared/eval; closed loop. "
        f"Machine: {result['machine'].get('cpu', '?')}, {result['machine'].get('cores', '?')} cores. "
        "`python -m benchmarks.ray_serve`.",
        "",
        f"| config | p50 latency at {low} client (s) | Ray overhead at {low} (s) | audio s/s at {high} | requests/s at {high} "
        f"| p95 latency at {high} (s) | mean batch at {high} | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, records in runs.items():
        one, many = _at(records, low), _at(records, high)
        overhead = one["latency_s"]["p50"] - plain_low["latency_s"]["p50"] if one and plain_low and name != "plain" else None
        fmt = lambda v, p=2: "–" if v is None else f"{v:.{p}f}"  # noqa: E731
        lines.append(
            f"| {name} | {fmt(one and one['latency_s']['p50'])} | {fmt(overhead, 3)} | {fmt(many and many['audio_s_per_s'])} "
            f"| {fmt(many and many['requests_per_s'])} | {fmt(many and many['latency_s']['p95'])} "
            f"| {fmt(many and many['mean_batch_size'])} | {sum(r['errors'] for r in records)} |"
        )
    per_replica = None
    two = _at(runs.get("ray-2x1", []), high)
    if two:
        per_replica = two["audio_s_per_s"] / 2
    lines += [
        "",
        "## Capacity model",
        "",
        "Each model replica holds its own model, engine and scheduler, and batches only what it is sent; "
        "replicas share no state, so throughput adds up across replicas and nodes. For N nodes of C cores with one "
        "replica per core (SERVE_REPLICA_CPUS=1, TORCH_THREADS=1):",
        "",
        "    throughput(N) ≈ N × C × r,   r = one 1-thread replica's throughput at full load"
        + (f" (measured here: {per_replica:.2f} audio s/s per replica, from ray-2x1 at {high} clients)" if per_replica else ""),
        "",
        "while the request rate stays under what the HTTP side forwards. Shared between replicas: only Serve's HTTP "
        "proxy and the ingress deployment (upload parsing, audio decoding, the OpenAI error bodies), on the request path; "
        "Ray's GCS and Serve's controller are control plane, off it. The ingress scales out with SERVE_INGRESS_REPLICAS, "
        "and the proxy with proxy_location EveryNode behind a load balancer, so nothing stays a single point of "
        "throughput. Batches form per replica: at a fixed offered load, more replicas mean smaller batches each (the "
        "mean batch column), which costs per-window efficiency on CPU little and on GPU more.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="base")
    parser.add_argument("--requests", type=int, default=48, help="requests per run (default: 48, as loadtest)")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated client counts (default: 1,16)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"which of {', '.join(CONFIGS)}")
    parser.add_argument("--max-duration", type=float, default=None, help="longest clip drawn, in seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-dir", type=Path, default=DEFAULT_EVAL_DIR)
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    workload = build_workload(args.requests, args.seed, args.eval_dir, args.max_duration)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for name in args.configs.split(","):
        ray, settings = CONFIGS[name]
        print(f"{name}: {settings}", flush=True)
        if ray:
            runs[name] = _run_ray(settings, args.model, workload, concurrencies)
        else:
            runs[name] = _run_plain(settings, args.model, workload, concurrencies, args.out / "ray_serve_plain.log")
    result = {
        "model": args.model,
        "concurrencies": concurrencies,
        "configs": {name: CONFIGS[name][1] for name in runs},
        "workload": {"count": len(workload.items), "audio_seconds": sum(i.duration for i in workload.items), "seed": args.seed},
        "machine": machine_info(),
        "runs": runs,
    }
    write_results(args.out, "ray_serve", result, report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
