"""Server-side batching metrics from `GET /metrics` (Prometheus text format), as before/after deltas.

The server exports two histograms:

- `whisper_batch_size{model, variant}`: how many requests each model call served;
- `whisper_batch_padding_ratio{model, variant, stage}`: the share of padded (wasted) work in
  a batch, per `stage` (`encoder`, `decoder`).

A histogram's `_sum` and `_count` only grow, so the mean over one run is
Δsum / Δcount between a scrape before and one after it. A server without `/metrics`, or
without these metrics, gives None: the load test reports "n/a" and carries on.

Gauges (the soak's queue depth and, for a server it did not spawn, resident memory) are read
from one scrape with `gauge_sum`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BATCH_SIZE = "whisper_batch_size"
PADDING_RATIO = "whisper_batch_padding_ratio"
PADDING_STAGES = ("encoder", "decoder")


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


# A snapshot keeps only what the deltas need: histogram `_sum` and `_count` samples.
Snapshot = dict[tuple[str, frozenset], float]


def parse_samples(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:  # the client library is optional: the server may export metrics without it
        return parse_text_format(text)
    return [
        Sample(s.name, dict(s.labels), float(s.value)) for family in text_string_to_metric_families(text) for s in family.samples
    ]


_SAMPLE_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse_text_format(text: str) -> list[Sample]:
    """The `name{label="value",...} number` lines of the text format, for when prometheus_client is absent."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_LINE.match(line)
        if not match:
            continue
        labels = {
            key: re.sub(r"\\[\\\"n]", lambda m: _UNESCAPE[m.group(0)], value)
            for key, value in _LABEL.findall(match.group("labels") or "")
        }
        samples.append(Sample(match.group("name"), labels, float(match.group("value"))))
    return samples


def snapshot(text: str | None) -> Snapshot | None:
    """The `_sum` / `_count` samples of a scrape; None when the server has no /metrics."""
    if text is None:
        return None
    try:
        samples = parse_samples(text)
    except ValueError:  # an exposition we cannot read counts as no metrics: the figures say n/a
        return None
    return {(s.name, frozenset(s.labels.items())): s.value for s in samples if s.name.endswith(("_sum", "_count"))}


def histogram_mean_delta(before: Snapshot | None, after: Snapshot | None, metric: str, **match: str) -> float | None:
    """Mean of the observations made between two scrapes, over label sets that carry all of `match`.

    Δsum and Δcount are added up across matching label sets first, so a label the caller does
    not name (say, a per-worker one) is pooled rather than averaged as separate means.
    """
    if after is None:
        return None
    before = before or {}
    wanted = set(match.items())
    delta_sum = delta_count = 0.0
    found = False
    for (name, labels), value in after.items():
        if not wanted <= labels:
            continue
        if name == f"{metric}_sum":
            delta_sum += value - before.get((name, labels), 0.0)
            found = True
        elif name == f"{metric}_count":
            delta_count += value - before.get((name, labels), 0.0)
    if not found or delta_count <= 0:
        return None
    return delta_sum / delta_count


def batching_means(before: Snapshot | None, after: Snapshot | None, model: str, variant: str) -> dict[str, float | None]:
    """Mean batch size and mean encoder / decoder padding ratio of one run of `model:variant`."""
    means = {"mean_batch_size": histogram_mean_delta(before, after, BATCH_SIZE, model=model, variant=variant)}
    for stage in PADDING_STAGES:
        means[f"{stage}_padding"] = histogram_mean_delta(before, after, PADDING_RATIO, model=model, variant=variant, stage=stage)
    return means


def gauge_sum(text: str | None, metric: str, **match: str) -> float | None:
    """A gauge's value in one scrape, added up over the label sets that carry all of `match`
    (e.g. `whisper_queue_windows` over its `model` label); None when the scrape has no such sample."""
    if text is None:
        return None
    try:
        samples = parse_samples(text)
    except ValueError:
        return None
    wanted = set(match.items())
    values = [s.value for s in samples if s.name == metric and wanted <= set(s.labels.items())]
    return sum(values) if values else None
