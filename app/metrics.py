"""Prometheus metrics of the service, on one registry per app (tests start several apps).

Label sets are bounded: model and variant come from the configured lists, stage is fixed."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from optim.decoding import BatchStats

BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.batch_size = Histogram(
            "whisper_batch_size", "Windows decoded together in one batch.", ["model", "variant"],
            buckets=BATCH_SIZE_BUCKETS, registry=self.registry,
        )
        self.padding_ratio = Histogram(
            "whisper_batch_padding_ratio",
            "Share of a batch's work spent on padding: 1 - sum(lengths) / (batch size x longest), "
            "for encoder frames and for decoder steps.",
            ["model", "variant", "stage"],
            buckets=RATIO_BUCKETS, registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "whisper_batch_seconds", "Wall time of one batch on the model's worker.", ["model", "variant"],
            registry=self.registry,
        )

    def observe_batch(self, model: str, variant: str, stats: BatchStats, seconds: float) -> None:
        self.batch_size.labels(model, variant).observe(stats.batch_size)
        self.padding_ratio.labels(model, variant, "encoder").observe(stats.encoder_padding)
        self.padding_ratio.labels(model, variant, "decoder").observe(stats.decoder_padding)
        self.batch_seconds.labels(model, variant).observe(seconds)
