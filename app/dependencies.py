"""Shared objects, handed to routers through FastAPI dependencies."""

from __future__ import annotations

from fastapi import Request

from app.service import TranscriptionService
from app.settings import Settings
from optim.engine import WhisperEngine


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> WhisperEngine:
    return request.app.state.engine


def get_service(request: Request) -> TranscriptionService:
    return request.app.state.service
