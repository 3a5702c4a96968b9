"""Prometheus metrics of the service, on one registry per app (tests start several apps).

Label sets are bounded: `model` and `variant` are served names (or "none" for a request refused
before its model was known), `endpoint`, `status` (a class: 2xx, 4xx, 5xx), `stage` and `unit`
are fixed sets. Nothing is labelled per request.

Three sources feed it: the HTTP middleware (`RequestCounter`: every request to a counted
endpoint, whatever its fate), the service (one `observe` per finished transcription) and the
scheduler (`observe_batch`). Gauges of live state (queue, memory, weights) are read at scrape time.
"""

from __future__ import annotations

import asyncio
import time
from typing import Iterator

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import CLIENT_CLOSED, INTERNAL_ERROR
from optim.budget import AudioBudget
from optim.decoding import BatchStats
from optim.memory import rss_mb
from optim.models import ModelStore
from optim.scheduler import Scheduler
from optim.types import ModelRef, Outcome

UNRESOLVED = "none"  # model/variant label of a request refused before its model was known

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
DECODE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
RTFX_BUCKETS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 200, 500)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
ERROR_RATE_BUCKETS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0)
REALTIME_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30)
INTERIM_OUTCOMES = ("run", "skipped", "preempted")  # an interim decode started, was skipped (no room), or gave way to a final


disable_created_metrics()  # no `_created` series: Prometheus does not need them, and they double /metrics


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class Metrics:
    def __init__(self, endpoints: list[str]) -> None:
        """`endpoints`: the `endpoint` label's values (the counted routes' names)."""
        self.endpoints = list(endpoints)
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
        model_variant = ["model", "variant"]

        # Requests, counted by the HTTP middleware whatever their fate.
        self.requests = Counter(
            "whisper_requests", "Audio requests answered, by status class.", [*model_variant, "endpoint", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "whisper_request_duration_seconds",
            "Total server time of a successful request: upload, audio decoding, queue, compute and response.",
            [*model_variant, "endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge("whisper_requests_in_flight", "Requests being transcribed now.", model_variant, registry=r)
        self.stream_first_delta_seconds = Histogram(
            "whisper_stream_first_delta_seconds",
            "A streamed transcription (stream=true): from the parsed request to its first text delta sent.",
            model_variant, buckets=LATENCY_BUCKETS, registry=r,
        )

        # Stages of a successful transcription.
        self.queue_seconds = Histogram(
            "whisper_request_queue_seconds", "From scheduling to the first batch holding one of the request's windows.",
            model_variant, buckets=LATENCY_BUCKETS, registry=r,
        )
        self.compute_seconds = Histogram(
            "whisper_request_compute_seconds", "From the first batch to the last window's result.",
            model_variant, buckets=LATENCY_BUCKETS, registry=r,
        )
        self.decode_seconds = Histogram(
            "whisper_audio_decode_seconds", "Decoding an upload to 16 kHz mono samples (also when it fails).", buckets=DECODE_BUCKETS, registry=r
        )
        self.audio_seconds = Counter("whisper_audio_seconds", "Seconds of audio transcribed.", model_variant, registry=r)
        self.rtfx = Histogram(
            "whisper_rtfx", "Inverse real-time factor of a request: audio seconds / compute seconds.",
            model_variant, buckets=RTFX_BUCKETS, registry=r,
        )

        # Batches, from the scheduler.
        self.batch_size = Histogram(
            "whisper_batch_size", "Windows decoded together in one batch.", model_variant,
            buckets=BATCH_SIZE_BUCKETS, registry=r,
        )
        self.padding_ratio = Histogram(
            "whisper_batch_padding_ratio",
            "Share of a batch's work spent on padding: 1 - sum(lengths) / (batch size x longest), "
            "for encoder frames and for decoder steps.",
            [*model_variant, "stage"], buckets=RATIO_BUCKETS, registry=r,
        )
        self.batch_seconds = Histogram(
            "whisper_batch_seconds", "Wall time of one batch on the model's worker.", model_variant,
            buckets=LATENCY_BUCKETS, registry=r,
        )

        # Accuracy, from requests that carry a reference transcript. The counters give the corpus
        # error rate (errors / reference length over all requests), the histograms the spread.
        self.wer = Histogram("whisper_wer", "Word error rate of a request with a reference.", model_variant,
                             buckets=ERROR_RATE_BUCKETS, registry=r)
        self.cer = Histogram("whisper_cer", "Character error rate of a request with a reference.", model_variant,
                             buckets=ERROR_RATE_BUCKETS, registry=r)
        self.reference_errors = Counter(
            "whisper_reference_errors", "Substitutions + deletions + insertions against references.",
            [*model_variant, "unit"], registry=r,
        )
        self.reference_units = Counter(
            "whisper_reference_units", "Length of the references (words or characters), after normalization.",
            [*model_variant, "unit"], registry=r,
        )

        # Realtime sessions (GET /v1/realtime, app/realtime.py). Unlabelled (the outcome label has a
        # fixed pair of values, created here), so every series exists at zero before the first session.
        self.realtime_sessions = Gauge("whisper_realtime_sessions", "Realtime WebSocket sessions open now.", registry=r)
        self.realtime_turn_seconds = Histogram(
            "whisper_realtime_turn_latency_seconds",
            "End of a realtime turn (the audio chunk in which the VAD heard it end, or the client's commit) to its "
            "completed transcript sent.", buckets=REALTIME_BUCKETS, registry=r,
        )
        self.realtime_first_delta_seconds = Histogram(
            "whisper_realtime_first_delta_seconds",
            "Speech detected in a realtime turn (the audio chunk in which the VAD heard it start) to the turn's first "
            "transcription delta sent.", buckets=REALTIME_BUCKETS, registry=r,
        )
        self.realtime_audio_seconds = Counter(
            "whisper_realtime_audio_seconds", "Seconds of audio received by realtime sessions.", registry=r
        )
        self.realtime_vad_seconds = Counter(
            "whisper_realtime_vad_cpu_seconds", "CPU seconds spent in voice activity detection (Silero VAD) for realtime sessions.",
            registry=r,
        )
        self.realtime_interim = Counter(
            "whisper_realtime_interim_decodes", "Interim decodes of realtime turns being spoken: run (started), skipped "
            "(the engine had no room), preempted (cancelled for another turn's final decode).", ["outcome"], registry=r,
        )
        for outcome in INTERIM_OUTCOMES:
            self.realtime_interim.labels(outcome)

    def initialize(self, refs: list[ModelRef]) -> None:
        """Create every series of these (model, variant) pairs at zero. A series that first appears
        already at 1 loses that first increment to rate() and increase() (Prometheus sees no change),
        which would drop the first request from throughput, corpus WER and request counts. Only the
        pairs expected to serve (each model's default variant, the preloaded ones): all of them
        would fill every panel with flat lines for variants nobody uses."""
        endpoints, statuses = self.endpoints, ("2xx", "4xx", "5xx")
        other_labels = {  # the values of each metric's labels after model and variant
            self.requests: [(e, s) for e in endpoints for s in statuses],
            self.request_seconds: [(e,) for e in endpoints],
            self.padding_ratio: [("encoder",), ("decoder",)],
            self.reference_errors: [("word",), ("char",)],
            self.reference_units: [("word",), ("char",)],
        }
        per_variant = (
            self.requests, self.request_seconds, self.in_flight, self.queue_seconds, self.compute_seconds,
            self.audio_seconds, self.rtfx, self.batch_size, self.padding_ratio, self.batch_seconds,
            self.wer, self.cer, self.reference_errors, self.reference_units, self.stream_first_delta_seconds,
        )
        for ref in refs:
            for metric in per_variant:
                for rest in other_labels.get(metric, [()]):
                    metric.labels(ref.model, str(ref.variant), *rest)

    def watch(self, models: ModelStore, scheduler: Scheduler, budget: AudioBudget | None = None) -> None:
        """Export the live state of these at every scrape (queue, memory, weights, decoded audio held)."""
        self.registry.register(_LiveState(models, scheduler, budget))

    def observe_batch(self, ref: ModelRef, stats: BatchStats, seconds: float) -> None:
        labels = (ref.model, str(ref.variant))
        self.batch_size.labels(*labels).observe(stats.batch_size)
        self.padding_ratio.labels(*labels, "encoder").observe(stats.encoder_padding)
        self.padding_ratio.labels(*labels, "decoder").observe(stats.decoder_padding)
        self.batch_seconds.labels(*labels).observe(seconds)

    def observe(self, outcome: Outcome) -> None:
        """One finished transcription."""
        t, timing, score = outcome.transcript, outcome.timing, outcome.score
        labels = (t.model, t.variant)
        self.audio_seconds.labels(*labels).inc(t.duration)
        if outcome.rtfx is not None:  # silence is answered without running the model: no speed to report
            self.queue_seconds.labels(*labels).observe(timing.queue_seconds)
            self.compute_seconds.labels(*labels).observe(timing.compute_seconds)
            self.rtfx.labels(*labels).observe(outcome.rtfx)
        if score is not None:
            self.wer.labels(*labels).observe(score.wer)
            self.cer.labels(*labels).observe(score.cer)
            for unit, errors, length in (("word", score.word_errors, score.words), ("char", score.char_errors, score.chars)):
                self.reference_errors.labels(*labels, unit).inc(errors)
                self.reference_units.labels(*labels, unit).inc(length)


class _LiveState(Collector):
    def __init__(self, models: ModelStore, scheduler: Scheduler, budget: AudioBudget | None):
        self.models = models
        self.scheduler = scheduler
        self.budget = budget

    def collect(self) -> Iterator[GaugeMetricFamily]:
        windows = GaugeMetricFamily("whisper_queue_windows", "Windows (<= 30 s) waiting for a batch.", labels=["model"])
        waiting = self.scheduler.waiting_windows()
        for model in self.models.sources:
            windows.add_metric([model], waiting.get(model, 0))
        yield windows
        yield GaugeMetricFamily(
            "whisper_queue_requests", "Requests admitted by the scheduler (waiting or running).", value=self.scheduler.admitted
        )
        if self.budget is not None:
            yield GaugeMetricFamily(
                "whisper_pending_audio_seconds", "Decoded audio held by requests in flight (what MAX_PENDING_AUDIO_SECONDS bounds).",
                value=self.budget.held_seconds,
            )
        weights = GaugeMetricFamily(
            "whisper_model_weight_bytes", "Bytes of weights of each built variant.", labels=["model", "variant"]
        )
        for built in self.models.variant_cache.built():
            weights.add_metric([built.ref.model, str(built.ref.variant)], built.weight_bytes)
        yield weights
        yield GaugeMetricFamily(
            "whisper_variant_cache_bytes", "Memory the built variants add to the loaded float32 models "
            "(what VARIANT_MEMORY_MB bounds).", value=self.models.variant_cache.used_bytes(),
        )
        _, peak_mb = rss_mb()
        yield GaugeMetricFamily(
            "whisper_process_peak_resident_memory_bytes", "Peak resident memory of the process.", value=peak_mb * 2**20
        )
        if torch.cuda.is_available():
            allocated = GaugeMetricFamily("whisper_cuda_memory_allocated_bytes", "CUDA memory held by tensors.", labels=["device"])
            reserved = GaugeMetricFamily("whisper_cuda_memory_reserved_bytes", "CUDA memory reserved by PyTorch's caching "
                                         "allocator.", labels=["device"])
            for index in range(torch.cuda.device_count()):
                allocated.add_metric([str(index)], torch.cuda.memory_allocated(index))
                reserved.add_metric([str(index)], torch.cuda.memory_reserved(index))
            yield allocated
            yield reserved


class RequestCounter:
    """ASGI middleware: counts every request to a counted route by status class, and times the
    successful ones. It sits outside the upload-size limit and the error handlers, so refusals
    count too. `routes` maps a path to its `endpoint` label (create_app derives it from the
    routers: every route tagged as counted). The router names the model and variant in
    `request.state.model_labels` once it has resolved them."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: dict[str, str]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = INTERNAL_ERROR  # unless a response starts

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        except asyncio.CancelledError:  # the client went away: nginx's 499, a client-side outcome
            status = CLIENT_CLOSED
            raise
        finally:
            model, variant = scope.get("state", {}).get("model_labels", (UNRESOLVED, UNRESOLVED))
            # A streamed response started 200 but may end otherwise (an error event, a client that left): app/streaming.py
            status = scope.get("state", {}).get("final_status", status)
            self.metrics.requests.labels(model, variant, endpoint, status_class(status)).inc()
            if status_class(status) == "2xx":
                self.metrics.request_seconds.labels(model, variant, endpoint).observe(time.perf_counter() - start)
