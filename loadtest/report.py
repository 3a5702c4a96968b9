"""The comparison report: `<name>.json` (everything), `<name>.md` (tables), two PNG charts.

Speed-up is the throughput (audio-s/s) of a configuration divided by the baseline
configuration's at the same concurrency and variant. Transcript agreement is the WER of a
configuration's transcripts against the baseline's for the same items: 0 % means batching
changed no word, which is how accuracy is checked on audio that has no reference.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
from pathlib import Path

from loadtest import stats

BASELINE_PREFERRED = "unbatched"


# -- what the report is about ------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    # Package metadata, not `import torch`: the version is all we need, the import costs seconds.
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": _version("torch"),
    }


def baseline_config(config_names: list[str]) -> str:
    return BASELINE_PREFERRED if BASELINE_PREFERRED in config_names else config_names[0]


def agreement(runs: list[dict], baseline: str) -> list[dict]:
    """Transcript WER of every non-baseline run against the baseline run of the same variant and concurrency."""
    reference = {(r["variant"], r["concurrency"]): r["transcripts"] for r in runs if r["config"] == baseline}
    rows = []
    for run in runs:
        key = (run["variant"], run["concurrency"])
        if run["config"] == baseline or key not in reference:
            continue
        shared = len(reference[key].keys() & run["transcripts"].keys())
        rows.append(
            {
                "config": run["config"],
                "baseline": baseline,
                "variant": run["variant"],
                "concurrency": run["concurrency"],
                "items": shared,
                "wer": stats.transcript_agreement(reference[key], run["transcripts"]),
            }
        )
    return rows


def build_document(
    *, command: str, model: str, mode: str, servers: list[dict], workload: dict, runs: list[dict], settings: dict
) -> dict:
    config_names = list(dict.fromkeys(run["config"] for run in runs)) or [s["name"] for s in servers]
    baseline = baseline_config(config_names) if config_names else None
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine_info(),
        "model": model,
        "mode": mode,
        "settings": settings,
        "servers": servers,
        "baseline": baseline,
        "workload": workload,
        "runs": runs,
        "agreement": agreement(runs, baseline) if baseline else [],
    }


# -- Markdown ----------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def machine_line(machine: dict) -> str:
    return (
        f"{machine['cpu']} ({machine['cores']} cores), {machine['platform']}, "
        f"python {machine['python']}, torch {machine['torch']}"
    )


def markdown_tables(document: dict) -> str:
    """One table per variant, plus its transcript-agreement line (what the terminal shows at the end)."""
    runs, baseline = document["runs"], document["baseline"]
    model = document["model"]
    throughput = {(r["config"], r["variant"], r["concurrency"]): r["audio_s_per_s"] for r in runs}
    sections = []
    for variant in dict.fromkeys(r["variant"] for r in runs):
        header = (
            "| configuration | concurrency | audio-s/s | req/s | p50 (s) | p95 (s) | p99 (s) | errors | mean batch size "
            f"| encoder padding | decoder padding | WER % | speed-up vs {baseline} |"
        )
        lines = [f"### {model}:{variant}", "", header, "|" + "---|" * 13]
        for run in (r for r in runs if r["variant"] == variant):
            base = throughput.get((baseline, variant, run["concurrency"]))
            speedup = f"{run['audio_s_per_s'] / base:.2f}×" if base else "n/a"
            latency = run["latency_s"]
            lines.append(
                f"| {run['config']} | {run['concurrency']} | {run['audio_s_per_s']:.2f} | {run['requests_per_s']:.3f} "
                f"| {_num(latency['p50'])} | {_num(latency['p95'])} | {_num(latency['p99'])} | {run['errors']} "
                f"| {_num(run['mean_batch_size'])} | {_num(run['encoder_padding'], 3)} | {_num(run['decoder_padding'], 3)} "
                f"| {_percent(run['wer'])} | {speedup} |"
            )
        rows = [a for a in document["agreement"] if a["variant"] == variant]
        if rows:
            pairs = ", ".join(f"{a['config']} at {a['concurrency']}: {_percent(a['wer'])} % ({a['items']} items)" for a in rows)
            lines += ["", f"Transcript agreement (WER against {baseline}'s transcripts, same items and concurrency): {pairs}."]
        else:
            lines += ["", "Transcript agreement: n/a (one configuration only)."]
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def _servers_line(document: dict) -> str:
    if document["mode"] != "spawn":
        return "; ".join(f"external server at {s['url']}" for s in document["servers"]) or "none"
    described = []
    for server in document["servers"]:
        settings = ", ".join(f"{k}={v}" for k, v in server["env"].items()) or "server defaults"
        described.append(f"`{server['name']}` ({settings}; ready in {server['ready_s']} s)")
    shared = ", ".join(f"{k}={v}" for k, v in document["settings"]["server_env"].items())
    return "; ".join(described or ["none"]) + (f"; every server also with {shared}" if shared else "")


def markdown(document: dict) -> str:
    w = document["workload"]
    servers = _servers_line(document)
    wer_items = max((r["wer_items"] for r in document["runs"]), default=0)
    head = [
        f"# Load test: {document['model']}",
        "",
        f"Machine: {machine_line(document['machine'])}; {document['created']}.",
        "",
        f"Command: `{document['command']}`",
        "",
        f"Workload: {w['count']} requests ({w['with_reference']} with a reference transcript), "
        f"{w['total_audio_s']:.1f} s of audio, clip durations {w['duration_min_s']:.1f} / {w['duration_median_s']:.1f} / "
        f"{w['duration_max_s']:.1f} s (min / median / max), seed {w['seed']}. "
        "The same requests in the same order for every row.",
        "",
        f"Servers: {servers}.",
        "",
        "Closed loop: each of `concurrency` clients sends the next clip as soon as its previous answer arrives. "
        "audio-s/s = seconds of audio transcribed per second of wall time; latency = request sent to answer received, "
        "successful requests; mean batch size and padding (share of padded work per model call) come from the "
        f"server's /metrics over the run (n/a: not exported); WER % over the {wer_items} referenced items, "
        "after Whisper's English normalizer.",
        "",
    ]
    if not document["settings"]["complete"]:
        head += ["**Incomplete: the load test stopped early; only the runs below finished.**", ""]
    return "\n".join(head) + "\n" + markdown_tables(document)


# -- charts ------------------------------------------------------------------------------------


def charts(document: dict, throughput_png: Path, latency_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    runs = document["runs"]
    machine = document["machine"]
    where = f"{machine['cpu']}, {machine['cores']} cores"
    concurrencies = sorted({r["concurrency"] for r in runs})
    configs = list(dict.fromkeys(r["config"] for r in runs))
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    series = list(dict.fromkeys((r["config"], r["variant"]) for r in runs))
    # One colour per variant, one line style and marker per configuration: a variant's
    # batched and unbatched lines sit side by side in the same colour.
    line_styles, markers = ["-", "--", ":", "-."], ["o", "s", "^", "D"]

    def plot(axis, value_of, ylabel: str) -> None:
        for config, variant in series:
            points = sorted((r["concurrency"], value_of(r)) for r in runs if r["config"] == config and r["variant"] == variant)
            points = [(c, v) for c, v in points if v is not None]
            if points:
                xs, ys = zip(*points)
                style = configs.index(config)
                axis.plot(
                    xs,
                    ys,
                    linestyle=line_styles[style % len(line_styles)],
                    marker=markers[style % len(markers)],
                    color=f"C{variants.index(variant) % 10}",
                    label=f"{config} · {variant}",
                )
        axis.set_xscale("log", base=2)
        axis.set_xticks(concurrencies, [str(c) for c in concurrencies])
        axis.minorticks_off()
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(ylabel)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")

    figure, axis = plt.subplots(figsize=(7, 4.5))
    plot(axis, lambda r: r["audio_s_per_s"], "audio seconds per second")
    axis.set_title(f"{document['model']}: throughput under load\n{where}", fontsize="medium")
    figure.tight_layout()
    figure.savefig(throughput_png, dpi=120)
    plt.close(figure)

    figure, (p50_axis, p95_axis) = plt.subplots(1, 2, figsize=(11, 4.5))
    plot(p50_axis, lambda r: r["latency_s"]["p50"], "p50 latency (s)")
    plot(p95_axis, lambda r: r["latency_s"]["p95"], "p95 latency (s)")
    p50_axis.set_title("p50", fontsize="medium")
    p95_axis.set_title("p95", fontsize="medium")
    figure.suptitle(f"{document['model']}: request latency under load — {where}", fontsize="medium")
    figure.tight_layout()
    figure.savefig(latency_png, dpi=120)
    plt.close(figure)


def write_report(document: dict, out_dir: Path, name: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / f"{name}.json",
        "markdown": out_dir / f"{name}.md",
        "throughput_png": out_dir / f"{name}_throughput.png",
        "latency_png": out_dir / f"{name}_latency.png",
    }
    paths["json"].write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    paths["markdown"].write_text(markdown(document))
    charts(document, paths["throughput_png"], paths["latency_png"])
    return paths
