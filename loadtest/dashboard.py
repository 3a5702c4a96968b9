"""`python -m loadtest.dashboard`: what the Grafana dashboard shows, rendered to a PNG from a real run.

Starts the service and a real Prometheus scraping it, runs the load test against the service (the
same seeded workload as `python -m loadtest`, whose clients send references so the WER panels have
data), then evaluates every query of docker/grafana/dashboards/whisper-serve.json over the run and
draws each panel where the dashboard puts it: time series as lines, bar gauges and stats as bars.
Writes benchmarks/NAME.png, NAME.json (each panel's final values) and the load test's own report.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.gridspec import GridSpec  # noqa: E402

from loadtest import cli  # noqa: E402
from loadtest.prometheus import DASHBOARD, PanelQuery, Prometheus, dashboard_panels, dashboard_queries, legend, substitute  # noqa: E402
from loadtest.server import DEFAULT_CONFIGS, spawned_server  # noqa: E402

SCRAPE_INTERVAL_S = 2
RATE_WINDOW = "30s"  # what Grafana's $__rate_interval would be at this zoom: several scrapes per window
POINTS = 200  # samples per time series


def scale(unit: str | None, value: float) -> tuple[float, str]:
    """A value in a readable unit for the axis: (scaled value, unit label)."""
    if unit == "bytes":
        return value / 2**20, "MiB"
    if unit == "percentunit":
        return 100 * value, "%"
    if unit == "s":
        return value, "s"
    if unit == "reqps":
        return value, "req/s"
    if unit and unit.startswith("suffix:"):  # Grafana's custom unit, e.g. "suffix:×"
        return value, unit.removeprefix("suffix:")
    return value, "" if unit in (None, "none", "short") else unit


def _values(result: list[dict]) -> list[tuple[dict, float]]:
    return [(s["metric"], float(s["value"][1])) for s in result if math.isfinite(float(s["value"][1]))]


def evaluate(prometheus: Prometheus, queries: list[PanelQuery], start: float, end: float) -> dict[str, list[dict]]:
    """Per panel title: its series over the run (time series) or at the end (everything else)."""
    # Grafana's $__range: the run, and the scrapes just before it (zeros), so increase() counts its first requests
    run = f"{math.ceil(end - start) + 2 * SCRAPE_INTERVAL_S}s"
    step = max(SCRAPE_INTERVAL_S, (end - start) / POINTS)
    panels: dict[str, list[dict]] = defaultdict(list)
    for q in queries:
        expr = substitute(q.expr, rate_interval=RATE_WINDOW, range_=run, interval=f"{step:.0f}s")
        if q.panel_type == "timeseries":
            for series in prometheus.query_range(expr, start, end, step):
                points = [(float(t) - start, float(v)) for t, v in series["values"] if math.isfinite(float(v))]
                panels[q.panel].append({"legend": legend(q.legend, series["metric"]), "points": points, "unit": q.unit})
        else:
            for labels, value in _values(prometheus.query(expr, at=end)):
                panels[q.panel].append({"legend": legend(q.legend, labels), "value": value, "unit": q.unit})
    return panels


def draw(panels: dict[str, list[dict]], out: Path, subtitle: str) -> None:
    layout = [p for p in dashboard_panels() if p.get("type") != "row" or p.get("title")]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in layout)
    fig = plt.figure(figsize=(24, rows * 0.5))
    grid = GridSpec(rows, 24, figure=fig, hspace=1.8, wspace=1.2, top=0.97, bottom=0.02, left=0.04, right=0.99)
    for panel in layout:
        x, y, w, h = (panel["gridPos"][k] for k in ("x", "y", "w", "h"))
        if panel["type"] == "row":
            ax = fig.add_subplot(grid[y : y + h, :])
            ax.axis("off")
            ax.text(0, 0.5, panel["title"], fontsize=13, weight="bold", va="center")
            continue
        ax = fig.add_subplot(grid[y : y + h, x : x + w])
        ax.set_title(panel["title"], fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
        series = panels.get(panel["title"], [])
        if not series:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", color="grey", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        if "points" in series[0]:
            for s in series:
                xs = [t / 60 for t, _ in s["points"]]
                ys = [scale(s["unit"], v)[0] for _, v in s["points"]]
                ax.plot(xs, ys, label=s["legend"], linewidth=1.2)
            ax.set_xlabel("minutes into the run", fontsize=7)
            ax.set_ylabel(scale(series[0]["unit"], 0)[1], fontsize=7)
            ax.legend(fontsize=6, loc="upper left", ncol=2)
        else:
            labels = [s["legend"] for s in series]
            values = [scale(s["unit"], s["value"])[0] for s in series]
            unit = scale(series[0]["unit"], 0)[1]
            bars = ax.barh(range(len(values)), values, color="tab:blue")
            ax.set_yticks(range(len(values)), labels, fontsize=7)
            ax.invert_yaxis()
            for bar, v in zip(bars, values):
                ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:.3g} {unit}", va="center", fontsize=7)
            ax.set_xlim(0, max(values) * 1.35 or 1)
    fig.suptitle(f"whisper-serve dashboard: {subtitle}", fontsize=15, x=0.01, y=0.995, ha="left")
    fig.savefig(out, dpi=80, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="base")
    parser.add_argument("--variants", default="flash,int8+flash")
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--requests", type=int, default=24, help="requests per variant and concurrency level")
    parser.add_argument("--eval-dir", type=Path, default=None, help="as for python -m loadtest")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--name", default="dashboard")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    variants = [v for v in args.variants.split(",") if v]
    config = next(c for c in DEFAULT_CONFIGS if c.name == "batched")
    with spawned_server(args.model, variants, config, {}, args.out / f"{args.name}_server.log") as (url, _):
        with Prometheus(target=url.removeprefix("http://"), interval=f"{SCRAPE_INTERVAL_S}s") as prometheus:
            prometheus.wait_for_scrapes(2)
            start = time.time()
            loadtest_args = ["--url", url, "--model", args.model, "--variants", args.variants, "--concurrency",
                             args.concurrency, "--requests", str(args.requests), "--out", str(args.out),
                             "--name", f"{args.name}_loadtest"]
            if args.eval_dir is not None:
                loadtest_args += ["--eval-dir", str(args.eval_dir)]
            code = cli.main(loadtest_args)
            if code != 0:
                return code
            prometheus.wait_for_scrapes(2)
            end = time.time()
            panels = evaluate(prometheus, dashboard_queries(), start, end)
    subtitle = (f"{args.model} ({', '.join(variants)}), load test at {args.concurrency} clients, "
                f"{(end - start) / 60:.1f} min, Prometheus every {SCRAPE_INTERVAL_S} s")
    draw(panels, args.out / f"{args.name}.png", subtitle)
    final = {
        title: [{"legend": s["legend"], "value": s.get("value", s["points"][-1][1] if s.get("points") else None)} for s in series]
        for title, series in panels.items()
    }
    (args.out / f"{args.name}.json").write_text(
        json.dumps({"dashboard": str(DASHBOARD.relative_to(DASHBOARD.parents[3])), "run_seconds": round(end - start, 1),
                    "subtitle": subtitle, "panels": final}, indent=2)
    )
    print(f"wrote {args.out / f'{args.name}.png'} and {args.out / f'{args.name}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
