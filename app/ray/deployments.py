"""The service as a Ray Serve application: one `Ingress` deployment (the whole FastAPI app of
create_app: auth, limits, parsing, audio decoding, formats, request metrics, OpenAI error bodies;
no weights) and one `ModelReplica` deployment per served model (its store, engine and
duration-bucketing scheduler: batching across requests happens inside each replica).

Every replica, ingress and model alike, serves its own metrics registry on a port of its node
and registers that target in `TargetRegistry` (a detached named actor), which the ingress lists
at GET /metrics/targets in Prometheus's HTTP service-discovery format."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

import numpy as np
import ray
import torch
from fastapi import FastAPI
from prometheus_client import start_http_server
from ray import serve
from ray.serve import Application

from app.metrics import Metrics
from app.ray.remote import Failure, IngressModels, RemoteScheduler, deployment_name
from app.settings import Settings
from app.main import build_scheduler, build_store, create_app, lane_plan, scheduler_config
from optim.weights import resolve_model_sources
from optim.engine import WhisperEngine
from optim.errors import ServiceError
from optim.types import ModelRef, TranscriptionOptions

log = logging.getLogger("app.ray")

REGISTRY_NAME = "whisper_metrics_targets"
NAMESPACE = "whisper"
HEARTBEAT_S = 5.0  # a replica re-registers this often ...
TARGET_TTL_S = 15.0  # ... and drops out of the list this long after its last (a dead one stops)
READY_POLL_S = 2.0
ENDPOINTS = ["transcriptions", "translations"]  # the `endpoint` label's values, as in create_app


@ray.remote(num_cpus=0)
class TargetRegistry:
    """Metrics targets by replica, with the time each last registered."""

    def __init__(self):
        self.targets: dict[str, tuple[float, dict]] = {}

    def put(self, replica: str, target: dict) -> None:
        self.targets[replica] = (time.monotonic(), target)

    def list(self) -> list[dict]:
        now = time.monotonic()
        self.targets = {k: v for k, v in self.targets.items() if now - v[0] < TARGET_TTL_S}
        return [target for _, target in self.targets.values()]


def _registry():
    return TargetRegistry.options(name=REGISTRY_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote()


def export_metrics(metrics: Metrics, deployment: str) -> None:
    """Serve `metrics` on a free port of this node and keep it registered while the process lives."""
    host = ray.util.get_node_ip_address()
    server, _ = start_http_server(0, addr=host, registry=metrics.registry)
    context = serve.get_replica_context()
    target = {
        "targets": [f"{host}:{server.server_port}"],
        "labels": {"deployment": deployment, "replica": context.replica_tag, "pid": str(os.getpid())},
    }
    registry = _registry()

    def heartbeat() -> None:
        while True:
            try:
                registry.put.remote(context.replica_tag, target)
            except Exception:  # the registry restarting: the next beat registers again
                log.warning("could not register the metrics target", exc_info=True)
            time.sleep(HEARTBEAT_S)

    threading.Thread(target=heartbeat, name="metrics-target", daemon=True).start()


class ModelReplica:
    """One served model: what create_app builds for it (store, engine, scheduler, batch metrics)."""

    def __init__(self, settings: Settings, model_id: str):
        # one replica's lanes and threads share its reserved CPUs: replicas sharing a node do not oversubscribe it
        cores = max(1, round(settings.serve_replica_cpus))
        torch.set_num_threads(lane_plan(settings, cores)[1])
        self.store = build_store(settings, only=model_id)
        self.engine = WhisperEngine(self.store, silence_peak=settings.silence_peak)
        self.metrics = Metrics(endpoints=ENDPOINTS)
        self.scheduler = build_scheduler(settings, self.engine, self.metrics, cores)
        self.metrics.watch(self.store, self.scheduler)
        self.metrics.initialize([self.store.ref(model_id, check_ready=False), *self.store.startup_variants])
        self.store.load_startup()  # before Serve counts the replica as running: a running replica holds its model
        if not self.store.ready:
            raise RuntimeError(f"model {model_id!r} did not load: {self.store.load_errors}")
        export_metrics(self.metrics, deployment_name(model_id))

    async def transcribe(self, ref: ModelRef, samples: np.ndarray, options: TranscriptionOptions):
        try:
            return await self.scheduler.transcribe(ref, samples, options)
        except ServiceError as e:
            return Failure.of(e)

    async def transcribe_stream(self, ref: ModelRef, samples: np.ndarray, options: TranscriptionOptions):
        """("queued", None), ("text", piece)..., then ("result", (Transcript, Timing) or Failure)."""
        events: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(
            self.scheduler.transcribe(
                ref, samples, options, on_text=lambda t: events.put_nowait(("text", t)), on_queued=lambda: events.put_nowait(("queued", None))
            )
        )
        task.add_done_callback(lambda _: events.put_nowait(("end", None)))
        try:
            while (event := await events.get())[0] != "end":
                yield event
            try:
                yield "result", task.result()
            except ServiceError as e:
                yield "result", Failure.of(e)
        finally:
            task.cancel()

    def readiness(self) -> dict:
        return {"ready": self.store.ready, "pid": os.getpid()}

    def pid(self) -> int:
        return os.getpid()


class Ingress:
    """The HTTP front: create_app's FastAPI app, with a store that loads nothing and a scheduler
    that calls the model deployments (app/ray/remote.py). Built in the replica (Serve calls
    `__serve_build_asgi_app__` after __init__): the app holds locks and a metrics registry,
    which are not shipped from the driver."""

    def __init__(self, settings: Settings, models: dict):
        self.settings = settings
        self.models = models  # model id -> DeploymentHandle

    def __serve_build_asgi_app__(self) -> FastAPI:
        store = build_store(self.settings, load=False, cls=IngressModels)
        scheduler = RemoteScheduler(self.models, self.settings.serve_request_timeout_s, scheduler_config(self.settings))
        app = create_app(self.settings, store=store, scheduler_factory=lambda *_: scheduler)
        registry = _registry()

        @app.get("/metrics/targets", include_in_schema=False)
        async def metrics_targets() -> list[dict]:
            """Prometheus HTTP service discovery (http_sd_configs): every live replica's metrics."""
            return await registry.list.remote()

        export_metrics(app.state.metrics, "ingress")
        threading.Thread(target=self._poll_ready, args=(store,), name="ready-poll", daemon=True).start()
        return app

    def _poll_ready(self, store: IngressModels) -> None:
        """/ready: every model deployment answers from a replica that has its model loaded."""
        while True:
            state = {}
            for model_id, handle in self.models.items():
                try:
                    state[model_id] = handle.readiness.remote().result(timeout_s=READY_POLL_S)["ready"]
                except Exception:  # no replica running (starting, restarting): not ready
                    state[model_id] = False
            store.replicas = state
            time.sleep(READY_POLL_S)


def build_app(settings: Settings) -> Application:
    """The application: one model deployment per served model, bound to the ingress."""
    sources, _ = resolve_model_sources(settings.models, settings.models_dir)
    fixed = settings.serve_min_replicas == settings.serve_max_replicas
    scaling = (
        {"num_replicas": settings.serve_min_replicas}
        if fixed
        else {
            "autoscaling_config": {
                "min_replicas": settings.serve_min_replicas,
                "max_replicas": settings.serve_max_replicas,
                "target_ongoing_requests": settings.serve_target_ongoing_requests,
            }
        }
    )
    models = {
        model_id: serve.deployment(ModelReplica, name=deployment_name(model_id))
        .options(
            ray_actor_options={"num_cpus": settings.serve_replica_cpus},
            # the scheduler batches what is in flight on a replica: let it hold its whole queue
            max_ongoing_requests=settings.max_queue,
            max_queued_requests=settings.serve_max_queued_requests,
            health_check_period_s=5,
            **scaling,
        )
        .bind(settings, model_id)
        for model_id in sources
    }
    ingress = serve.deployment(serve.ingress()(Ingress), name="ingress")
    # The ingress parses and decodes (CPU work, off its event loop); 0.1 CPU leaves the cores to the models.
    # It must hold every request the model replicas may batch or Serve may queue for them, and
    # every realtime session (a WebSocket is one ongoing request for its whole life). Serve's
    # default, 5 ongoing requests per replica, kept the replicas' batches at 2-3 windows with 16
    # clients; and a request past the ingress's limit waits in the proxy, unbounded, where the
    # model's SERVE_MAX_QUEUED_REQUESTS would have refused it with our 503.
    per_model = settings.max_queue * settings.serve_max_replicas + settings.serve_max_queued_requests
    ongoing = per_model * len(models) + settings.max_realtime_sessions
    return ingress.options(
        num_replicas=settings.serve_ingress_replicas, max_ongoing_requests=ongoing, ray_actor_options={"num_cpus": 0.1}
    ).bind(settings, models)


def build(args: dict) -> Application:
    """`serve run app.ray.deployments:build` / a Serve config's import_path: settings from the
    environment, overridden by the config's `args` (lower-case setting names)."""
    return build_app(Settings(**(args or {})))
