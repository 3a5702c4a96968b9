"""A real Prometheus server scraping the service, and the queries of the Grafana dashboard.

Used by the tests (every dashboard query must parse and return data) and by `python -m
loadtest.dashboard` (the dashboard's panels rendered from a load-test run). Prometheus runs as a
plain process (Debian's `prometheus` package, or any binary on PATH) with a throw-away storage folder.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from loadtest.server import free_port, stop

REPO_ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = REPO_ROOT / "docker" / "grafana" / "dashboards" / "whisper-serve.json"

CONFIG = """\
global:
  scrape_interval: {interval}
  evaluation_interval: {interval}
scrape_configs:
  - job_name: whisper-serve
    static_configs:
      - targets: ["{target}"]
"""


def binary(name: str = "prometheus") -> str | None:
    return shutil.which(name)


class Prometheus:
    """`prometheus` on a loopback port, scraping `target` (host:port) every `interval`."""

    def __init__(self, target: str, interval: str = "1s"):
        executable = binary()
        if executable is None:
            raise FileNotFoundError("no `prometheus` on PATH (Debian: apt-get install prometheus)")
        self.folder = Path(tempfile.mkdtemp(prefix="prometheus-"))
        self.config = self.folder / "prometheus.yml"
        self.config.write_text(CONFIG.format(interval=interval, target=target))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = self.folder / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    executable,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.folder / 'data'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {timeout} s:\n{self.log.read_text()[-2000:]}")

    def _api(self, path: str, **params) -> object:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = response.json()
        if body.get("status") != "success":
            raise QueryError(f"{params.get('query', path)}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query's result: [{"metric": {...}, "value": [t, "v"]}, ...]."""
        params = {"query": expr} if at is None else {"query": expr, "time": at}
        return self._api("query", **params)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        """[{"metric": {...}, "values": [[t, "v"], ...]}, ...]."""
        return self._api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        return self._api(f"label/{label}/values", **{"match[]": match})

    def scrapes(self, metric: str = "up") -> int:
        """Samples of `metric` stored so far: grows by one per scrape."""
        result = self.query(f"count_over_time({metric}[1h])")
        return int(float(result[0]["value"][1])) if result else 0

    def wait_for_scrapes(self, count: int, timeout: float = 60) -> None:
        """Block until `count` more scrapes have been stored."""
        target = self.scrapes() + count
        deadline = time.monotonic() + timeout
        while self.scrapes() < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus stored fewer than {count} scrapes in {timeout} s")
            time.sleep(0.2)

    def stop(self) -> None:
        stop(self.process)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "Prometheus":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class QueryError(RuntimeError):
    pass


# ------------------------------------------------------------------------------- the dashboard
@dataclass(frozen=True)
class PanelQuery:
    panel: str  # the panel's title
    panel_type: str  # timeseries, bargauge, stat, ...
    expr: str  # as written in the dashboard, with Grafana's variables
    legend: str  # legendFormat, e.g. "{{model}}:{{variant}}"
    unit: str | None
    grid: tuple[int, int, int, int]  # x, y, w, h on Grafana's 24-column grid


def dashboard_panels(path: Path = DASHBOARD) -> list[dict]:
    """Every panel, those inside collapsed rows included, in the file's order."""
    panels = []
    for panel in json.loads(path.read_text())["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # a collapsed row keeps its panels inside it
    return panels


def dashboard_queries(path: Path = DASHBOARD) -> list[PanelQuery]:
    queries = []
    for panel in dashboard_panels(path):
        grid = panel.get("gridPos", {})
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        for target in panel.get("targets", []):
            if target.get("expr"):
                queries.append(
                    PanelQuery(
                        panel["title"],
                        panel["type"],
                        target["expr"],
                        target.get("legendFormat", ""),
                        unit,
                        (grid.get("x", 0), grid.get("y", 0), grid.get("w", 12), grid.get("h", 8)),
                    )
                )
    return queries


def template_queries(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(variable name, query) of the dashboard's query variables, e.g. ("model", "label_values(...)")."""
    variables = json.loads(path.read_text()).get("templating", {}).get("list", [])
    out = []
    for v in variables:
        if v.get("type") == "query":
            query = v.get("query")
            out.append((v["name"], query["query"] if isinstance(query, dict) else query))
    return out


LABEL_VALUES = re.compile(r"^label_values\(\s*(?:(?P<match>.+?)\s*,\s*)?(?P<label>\w+)\s*\)$")


def parse_label_values(query: str) -> tuple[str | None, str]:
    """Grafana's `label_values(metric, label)` → (metric selector or None, label)."""
    m = LABEL_VALUES.match(query.strip())
    if m is None:
        raise ValueError(f"not a label_values() query: {query!r}")
    return m["match"], m["label"]


def substitute(expr: str, rate_interval: str = "1m", range_: str = "5m", interval: str = "15s", selection: str = ".*") -> str:
    """Grafana's variables replaced as Grafana would: `$model`/`$variant` (All) by `.*`."""
    for name, value in (("__rate_interval", rate_interval), ("__range", range_), ("__interval", interval)):
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    return re.sub(r"\$\{?(\w+)\}?", selection, expr)


def legend(fmt: str, labels: dict[str, str]) -> str:
    """Grafana's legendFormat: `{{label}}` replaced by the series' label values."""
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), fmt) if fmt else ""
    return text or ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"
