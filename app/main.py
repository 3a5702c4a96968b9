"""The application factory: settings → model store → engine → scheduler → service → routers,
and model loading at start-up."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.formparsers import MultiPartParser

from app.api import audio, health, models
from app.api import metrics as metrics_api
from app.api import realtime as realtime_api
from app.auth import APIKeyAuth, configured_keys
from app.errors import install_error_handlers
from app.limits import UploadSizeLimit
from app.metrics import Metrics, RequestCounter
from app.openapi import install_docs, install_openapi
from app.realtime import RealtimeHub
from app.service import TranscriptionService
from app.settings import Settings
from app.shutdown import Shutdown
from optim.budget import AudioBudget
from optim.engine import WhisperEngine
from optim.models import ModelStore, resolve_device
from optim.scheduler import Scheduler, SchedulerConfig, lanes
from optim.weights import resolve_model_sources

log = logging.getLogger("app")


def build_store(settings: Settings, only: str | None = None, load: bool = True, cls: type[ModelStore] = ModelStore) -> ModelStore:
    """The settings' model store. `only`: just that model (a Ray model replica's); `load=False`:
    nothing loaded or built at start-up (the Ray ingress, which resolves names but holds no weights)."""
    sources, startup = resolve_model_sources(settings.models, settings.models_dir)
    if only is not None:
        sources, startup = {only: sources[only]}, [m for m in startup if m == only]
    preload = [v for v in settings.preload_variants if only is None or v.partition(":")[0] == only]
    return cls(
        sources,
        device=settings.device,
        variants=settings.variants or None,
        variant_budget_bytes=int(settings.variant_memory_mb * 2**20),
        variant_idle_ttl=settings.variant_idle_ttl_s,
        models_dir=settings.models_dir,
        default_variant=settings.default_variant,
        startup=startup if load else [],
        startup_variants=preload if load else [],
        on_demand=settings.on_demand_variants,
        builds_per_minute=settings.variant_builds_per_minute,
    )


def lane_plan(settings: Settings, cores: int | None = None) -> tuple[int, int]:
    """(batches of a model at once, torch threads) on `cores` cores (default: this process's)."""
    return lanes.plan(resolve_device(settings.device), cores or lanes.cpu_count(), settings.batch_lanes, settings.torch_threads)


def scheduler_config(settings: Settings, cores: int | None = None) -> SchedulerConfig:
    count, threads = lane_plan(settings, cores)
    return SchedulerConfig(
        max_batch_size=settings.max_batch_size,
        max_wait=settings.batch_max_wait_ms / 1000,
        max_batch_audio=settings.max_batch_audio_seconds,
        max_queue=settings.max_queue,
        policy=settings.batch_policy,
        shorten_context=settings.dynamic_audio_context,
        lanes=count,
        alone_encoder_threads=count * threads if count > 1 else None,
    )


def build_scheduler(settings: Settings, engine: WhisperEngine, metrics: Metrics, cores: int | None = None) -> Scheduler:
    return Scheduler(engine, scheduler_config(settings, cores), on_batch=metrics.observe_batch)


def create_app(settings: Settings | None = None, store: ModelStore | None = None, scheduler_factory=None) -> FastAPI:
    """`store` and `scheduler_factory` (engine, metrics → a scheduler) replace the local ones: the
    Ray ingress (app/ray/) passes a store that loads nothing and a scheduler that calls model replicas."""
    settings = settings or Settings()
    torch.set_num_threads(lane_plan(settings)[1])
    store = store or build_store(settings)
    engine = WhisperEngine(store, silence_peak=settings.silence_peak)

    app = FastAPI(
        title="whisper-serve",
        summary="OpenAI-compatible Whisper transcription service",
        version="0.1.0",
        docs_url=None,  # served by app/openapi.py from local files, not a CDN
        redoc_url=None,
    )
    routers = (health.router, models.router, audio.router, metrics_api.router)
    for router in routers:
        app.include_router(router)
    app.include_router(realtime_api.router)  # GET /v1/realtime (WebSocket): not counted, it has its own metrics
    # Every route tagged as counted is counted by the request counter, under its route name.
    counted = {r.path: r.name for router in routers for r in router.routes if isinstance(r, APIRoute) and audio.COUNTED in r.tags}

    metrics = Metrics(endpoints=list(counted.values()))
    scheduler = (scheduler_factory or build_scheduler)(settings, engine, metrics)
    shutdown = Shutdown(settings.shutdown_drain_s, settings.shutdown_timeout_s, abort=scheduler.abort)
    budget = AudioBudget(settings.max_pending_audio_seconds, retry_after=scheduler.retry_after)
    service = TranscriptionService(engine, scheduler, metrics, settings, shutdown, budget)  # checks the default model is served
    metrics.watch(store, scheduler, budget)
    realtime = RealtimeHub(service, settings, metrics, shutdown)
    metrics.initialize([store.ref(m, check_ready=False) for m in store.sources] + store.startup_variants)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load in the background: /health answers at once, /ready turns 200 when done.
        loading = asyncio.create_task(asyncio.to_thread(store.load_startup))
        yield
        loading.cancel()
        await scheduler.close()
        realtime.close()
        engine.close()

    app.router.lifespan_context = lifespan
    app.state.service = service
    app.state.shutdown = shutdown
    app.state.metrics = metrics
    app.state.realtime = realtime
    install_error_handlers(app)
    keys = configured_keys(settings)
    install_openapi(app, api_keys=bool(keys))
    install_docs(app)
    app.add_middleware(UploadSizeLimit, max_bytes=settings.max_upload_bytes, read_timeout=settings.request_read_timeout_s)
    if keys:  # outside the size limit: an unauthenticated upload gets 401, not 413, and is not read
        app.add_middleware(APIKeyAuth, keys=keys, protect_metrics=settings.metrics_require_key)
    # added last: outermost, so it sees the size limit's 413s
    app.add_middleware(RequestCounter, metrics=metrics, routes=counted)
    # Keep uploads in memory up to the size limit (Starlette spools to a temp file past 1 MiB).
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, settings.max_upload_bytes)
    return app
