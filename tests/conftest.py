"""Shared fixtures: real clips from tests/data, loaded models, and a real server over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from loadtest.server import free_port, stop, wait_until_ready
from optim.accuracy import corpus_wer, normalizer

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent


@dataclass(frozen=True)
class Clip:
    id: str
    path: Path
    text: str
    lang: str
    duration: float

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()


def _load_clips() -> dict[str, Clip]:
    clips = {}
    for line in (DATA / "manifest.jsonl").read_text().splitlines():
        d = json.loads(line)
        clips[d["id"]] = Clip(d["id"], DATA / d["audio"], d["text"], d["lang"], d["duration_s"])
    return clips


CLIPS = _load_clips()
ENGLISH_READ = [c for c in CLIPS.values() if (c.id == "jfk" or c.id.startswith("lj-")) and c.duration < 30]
LONG_FORM = [c for c in CLIPS.values() if c.duration > 30]  # several windows each

normalize = normalizer("en")


def english_wer(references: list[str], hypotheses: list[str]) -> float:
    """Corpus WER after Whisper's English normalizer: the service's own (optim/accuracy.py)."""
    return corpus_wer(references, hypotheses, "en")


@pytest.fixture(scope="session")
def clips() -> dict[str, Clip]:
    return CLIPS


@pytest.fixture(scope="session")
def tiny_model():
    from optim.weights import load_whisper

    return load_whisper("tiny.en")


@pytest.fixture(scope="session")
def base_model():
    from optim.weights import load_whisper

    return load_whisper("base")


class Server:
    """`python -m app` in a child process, on a loopback port, as a user would run it. With
    `log`, its stdout and stderr go to that file."""

    def __init__(self, log: Path | None = None, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port), "LOG_LEVEL": "warning", "SHUTDOWN_DRAIN_S": "0", **env}
        output = open(log, "wb") if log is not None else None
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app"], cwd=ROOT, env=environment, stdout=output, stderr=subprocess.STDOUT if output else None
        )
        if output is not None:
            output.close()  # the child holds its own copy of the descriptor

    def wait_ready(self, timeout: float = 120) -> "Server":
        wait_until_ready(self.url, self.process, None, timeout)
        return self

    def stop(self) -> None:
        stop(self.process)

    def __enter__(self) -> "Server":
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    # An empty models folder: the tests see the bundled models only, whatever ./models holds
    # (students built with `make students`, a user's checkpoints).
    models_dir = tmp_path_factory.mktemp("models")
    with Server(MODELS="tiny.en,base", DEFAULT_MODEL="base", MAX_AUDIO_SECONDS="300", MODELS_DIR=str(models_dir)) as srv:
        yield srv


@pytest.fixture(scope="session")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=300) as client:
        yield client


@pytest.fixture(scope="session")
def openai_client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", timeout=300, max_retries=0)
