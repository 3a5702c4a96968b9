"""The application factory: settings → engine → service → routers, and model loading at start."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from starlette.formparsers import MultiPartParser

from app.api import audio, health, models
from app.api import metrics as metrics_api
from app.errors import install_error_handlers
from app.limits import UploadSizeLimit
from app.metrics import Metrics, RequestCounter
from app.scheduler import Scheduler, SchedulerConfig
from app.service import TranscriptionService
from app.settings import Settings
from optim.engine import WhisperEngine
from optim.weights import resolve_model_sources

log = logging.getLogger("app")


def _load_models(service: TranscriptionService) -> None:
    for model_id in service.preload:
        try:
            service.engine.load(model_id)
        except Exception:
            log.exception("could not load model %s", model_id)
    for model_id, variant in service.preload_variants:
        try:
            service.engine.preload_variant(model_id, variant)
        except Exception as e:
            service.engine.load_errors[f"{model_id}:{variant}"] = f"{type(e).__name__}: {e}"
            log.exception("could not build variant %s:%s", model_id, variant)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    sources, preload = resolve_model_sources(settings.models, settings.models_dir)
    engine = WhisperEngine(
        sources,
        device=settings.device,
        silence_peak=settings.silence_peak,
        variants=settings.variants or None,
        variant_budget_bytes=int(settings.variant_memory_mb * 2**20),
        variant_idle_ttl=settings.variant_idle_ttl_s,
        models_dir=settings.models_dir,
    )
    metrics = Metrics()
    scheduler = Scheduler(
        engine,
        SchedulerConfig(
            max_batch_size=settings.max_batch_size,
            max_wait=settings.batch_max_wait_ms / 1000,
            max_batch_audio=settings.max_batch_audio_seconds,
            max_queue=settings.max_queue,
            policy=settings.batch_policy,
            shorten_context=settings.dynamic_audio_context,
        ),
        on_batch=metrics.observe_batch,
    )
    service = TranscriptionService(engine, scheduler, metrics, settings, preload)  # checks the defaults are served
    metrics.watch(engine, scheduler)
    metrics.initialize([(m, service.default_variant) for m in engine.sources] + service.preload_variants)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load in the background: /health answers at once, /ready turns 200 when done.
        loading = asyncio.create_task(asyncio.to_thread(_load_models, service))
        yield
        loading.cancel()
        await scheduler.close()
        engine.close()

    app = FastAPI(
        title="whisper-serve",
        summary="OpenAI-compatible Whisper transcription service",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.service = service
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_middleware(UploadSizeLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(RequestCounter, metrics=metrics)  # added last: outermost, so it sees the size limit's 413s
    # Keep uploads in memory up to the size limit (Starlette spools to a temp file past 1 MiB).
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, settings.max_upload_bytes)
    for router in (health.router, models.router, audio.router, metrics_api.router):
        app.include_router(router)
    return app
