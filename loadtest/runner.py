"""The measurement loop: configurations × variants × concurrency levels, with progress bars.

For each configuration one server (spawned, or the external one); for each variant a warm-up,
then one closed-loop run of the whole workload per concurrency level, each bracketed by two
/metrics scrapes so the batching figures belong to that run alone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from loadtest import client, metrics, stats
from loadtest.server import ServerConfig, spawned_server
from loadtest.workload import WorkItem, Workload

WARM_UP_REQUESTS = 2


@dataclass
class Plan:
    model: str
    variants: list[str]
    concurrencies: list[int]
    configs: list[ServerConfig]
    out_dir: Path
    name: str
    url: str | None = None  # None: spawn a server per configuration
    server_env: dict[str, str] = field(default_factory=dict)

    @property
    def spawn(self) -> bool:
        return self.url is None

    def log_path(self, config: ServerConfig) -> Path:
        return self.out_dir / f"{self.name}_server_{config.name}.log"


def summarize(outcome: client.RunOutcome, workload: Workload, batching: dict[str, float | None]) -> dict:
    """One run's figures; successful requests only for throughput, latency and WER (failures are counted apart)."""
    ok = [r for r in outcome.results if r.ok]
    references = {item.id: item.reference for item in workload.items if item.reference is not None}
    referenced = [r for r in ok if r.id in references]
    wer = stats.word_error_rate([references[r.id] for r in referenced], [r.text for r in referenced]) if referenced else None
    return {
        "wall_s": outcome.wall_s,
        "completed": len(ok),
        "errors": len(outcome.results) - len(ok),
        "audio_s_per_s": stats.audio_throughput([r.duration_s for r in ok], outcome.wall_s),
        "requests_per_s": stats.request_rate(len(ok), outcome.wall_s),
        "latency_s": stats.latency_percentiles([r.latency_s for r in ok]),
        **batching,
        "wer": wer,
        "wer_items": len(referenced),
        "requests": [
            {"id": r.id, "status": r.status, "latency_s": r.latency_s, "duration_s": r.duration_s, "error": r.error}
            for r in outcome.results
        ],
        "transcripts": {r.id: r.text for r in ok},
    }


def _warm_up_items(workload: Workload) -> list[WorkItem]:
    # The shortest clips: the warm-up is there to touch every code path once, not to cost time.
    return sorted(workload.items, key=lambda item: item.duration)[:WARM_UP_REQUESTS]


def _metric_labels(served_as: str | None, model: str, variant: str) -> tuple[str, str]:
    """The (model, variant) labels of this variant's metrics: as the server names it (X-Model), else as asked."""
    if served_as and ":" in served_as:
        served_model, _, served_variant = served_as.rpartition(":")
        return served_model, served_variant
    return model, variant


class LoadTest:
    """Runs a plan and collects one record per (configuration, variant, concurrency)."""

    def __init__(self, plan: Plan, workload: Workload, console: Console):
        self.plan = plan
        self.workload = workload
        self.console = console
        self.runs: list[dict] = []
        self.servers: list[dict] = []

    def run(self) -> list[dict]:
        plan = self.plan
        total = len(plan.configs) * len(plan.variants) * len(plan.concurrencies) * len(self.workload.items)
        columns = (
            SpinnerColumn(),
            TextColumn("{task.description}", markup=False),  # names may hold [brackets]
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.console) as progress:
            self.progress = progress
            self.overall = progress.add_task("all runs", total=total)
            self.current = progress.add_task("", total=None)
            for config in plan.configs:
                with self._server(config) as url:
                    for variant in plan.variants:
                        self.runs += asyncio.run(self._measure_variant(url, config, variant))
            progress.update(self.current, description="done", total=1, completed=1)
        return self.runs

    @contextlib.contextmanager
    def _server(self, config: ServerConfig) -> Iterator[str]:
        plan = self.plan
        if not plan.spawn:
            self.servers.append({"name": config.name, "url": plan.url})
            yield plan.url
            return
        self.progress.update(self.current, description=f"[{config.name}] starting server", total=None, completed=0)
        log = plan.log_path(config)
        with spawned_server(plan.model, plan.variants, config, plan.server_env, log) as (url, ready_s):
            self.progress.console.print(f"server {config.name} ready in {ready_s:.1f} s (log: {log})", markup=False)
            self.servers.append({"name": config.name, "env": config.env, "ready_s": round(ready_s, 2), "log": str(log)})
            yield url

    async def _measure_variant(self, url: str, config: ServerConfig, variant: str) -> list[dict]:
        plan, progress = self.plan, self.progress
        model_name = f"{plan.model}:{variant}"
        records = []
        async with client.new_client(url, max(plan.concurrencies)) as http:
            progress.update(self.current, description=f"[{config.name}] {model_name} warm-up", total=None, completed=0)
            served_as = await client.warm_up(http, _warm_up_items(self.workload), model_name)
            label_model, label_variant = _metric_labels(served_as, plan.model, variant)
            for concurrency in plan.concurrencies:
                progress.update(
                    self.current,
                    description=f"[{config.name}] {model_name} × {concurrency}",
                    total=len(self.workload.items),
                    completed=0,
                )

                def advance(result: client.RequestResult) -> None:
                    progress.advance(self.current)
                    progress.advance(self.overall)

                before = metrics.snapshot(await client.scrape_metrics(http))
                outcome = await client.run_closed_loop(http, self.workload.items, model_name, concurrency, advance)
                after = metrics.snapshot(await client.scrape_metrics(http))
                record = {
                    "config": config.name,
                    "variant": variant,
                    "concurrency": concurrency,
                    "model_name": model_name,
                    "served_as": served_as,
                    **summarize(outcome, self.workload, metrics.batching_means(before, after, label_model, label_variant)),
                }
                if record["errors"]:
                    first = next(r for r in outcome.results if not r.ok)
                    progress.console.print(
                        f"{config.name} {model_name} × {concurrency}: {record['errors']} failed requests "
                        f"(first: status {first.status}: {first.error})",
                        style="yellow",
                        markup=False,
                    )
                records.append(record)
        return records
