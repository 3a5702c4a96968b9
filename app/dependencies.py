"""Shared objects, handed to routers through FastAPI dependencies (set on app.state by create_app)."""

from __future__ import annotations

from fastapi import Request
from starlette.requests import HTTPConnection

from app.metrics import Metrics
from app.realtime import RealtimeHub
from app.service import TranscriptionService
from app.shutdown import Shutdown
from optim.models import ModelStore


def get_service(request: Request) -> TranscriptionService:
    return request.app.state.service


def get_models(request: Request) -> ModelStore:
    return request.app.state.service.models


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_shutdown(request: Request) -> Shutdown:
    return request.app.state.shutdown


def get_realtime(connection: HTTPConnection) -> RealtimeHub:
    """For WebSocket routes too (a WebSocket is an HTTPConnection, not a Request)."""
    return connection.app.state.realtime
