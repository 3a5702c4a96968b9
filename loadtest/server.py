"""The server under test: spawned per configuration (`python -m app`), or an external one given by URL.

A configuration is a name and the environment settings that make it different (batching on
is the server's defaults; batching off is `MAX_BATCH_SIZE=1`). Spawning a fresh server per
configuration keeps runs independent: no warm caches or queues carry over from another setting.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 600.0
STOP_GRACE_S = 20.0
LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class ServerConfig:
    name: str
    env: dict[str, str] = field(default_factory=dict)


DEFAULT_CONFIGS = (ServerConfig("batched"), ServerConfig("unbatched", {"MAX_BATCH_SIZE": "1"}))
EXTERNAL = ServerConfig("external")


def parse_env_assignment(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def parse_config(text: str) -> ServerConfig:
    """`NAME:KEY=VALUE,KEY=VALUE` (or a bare `NAME` for the server's defaults)."""
    name, _, assignments = text.partition(":")
    if not name.strip():
        raise ValueError(f"a configuration needs a name: {text!r}")
    env = dict(parse_env_assignment(a) for a in assignments.split(",") if a.strip())
    return ServerConfig(name.strip(), env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ServerFailed(RuntimeError):
    pass


def server_environment(
    model: str, variants: list[str], config: ServerConfig, extra_env: dict[str, str], port: int
) -> dict[str, str]:
    """What the spawned server sees: the caller's environment, then the test's settings.

    Precedence, last wins: the inherited environment, the load test's own settings, every
    `--server-env`, then the configuration's settings (they are what defines it: `unbatched`
    must stay at MAX_BATCH_SIZE=1 whatever else is passed).
    """
    return {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "MODELS": model,
        "DEFAULT_MODEL": model,
        # Built at start-up (and /ready waits for them), so the first measured request pays no build.
        "PRELOAD_VARIANTS": ",".join(f"{model}:{v}" for v in variants),
        "SHUTDOWN_DRAIN_S": "0",  # no load balancer to drain for: stop at once
        **extra_env,
        **config.env,
    }


def wait_until_ready(url: str, process: subprocess.Popen | None, log: Path | None, timeout: float = READY_TIMEOUT_S) -> float:
    """Poll GET /ready until 200; returns the seconds waited. Fails early if the process dies or reports a failed load."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process is not None and process.poll() is not None:
            raise ServerFailed(f"server exited with code {process.returncode} before it was ready; log tail:\n{log_tail(log)}")
        try:
            response = httpx.get(f"{url}/ready", timeout=5)
            if response.status_code == 200:
                return time.monotonic() - started
            # 503 means "still loading" unless the body says a model or variant failed to load.
            if _reports_failure(response):
                raise ServerFailed(
                    f"server reports a failed start-up: {response.text}\nlog tail:\n{log_tail(log) if log else ''}"
                )
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise ServerFailed(f"server not ready after {timeout:.0f} s; log tail:\n{log_tail(log) if log else ''}")


def _reports_failure(response: httpx.Response) -> bool:
    try:
        return response.json().get("status") == "failed"
    except (ValueError, AttributeError):
        return False


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (uvicorn shuts down cleanly), then SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass(frozen=True)
class SpawnedServer:
    url: str
    ready_s: float
    process: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.process.pid


@contextlib.contextmanager
def spawn_server(
    model: str, variants: list[str], config: ServerConfig, extra_env: dict[str, str], log_path: Path
) -> Iterator[SpawnedServer]:
    """`python -m app` for one configuration; yields it once ready (URL, seconds to ready, process). Always stopped on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = server_environment(model, variants, config, extra_env, port)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log_file:
        # The server's output goes to its log file: the terminal belongs to the progress bars.
        process = subprocess.Popen(
            [sys.executable, "-m", "app"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            ready_s = wait_until_ready(url, process, log_path)
            yield SpawnedServer(url, ready_s, process)
        finally:
            # Runs on normal exit, exceptions and Ctrl-C alike: no server outlives the load test.
            stop(process)


@contextlib.contextmanager
def spawned_server(
    model: str, variants: list[str], config: ServerConfig, extra_env: dict[str, str], log_path: Path
) -> Iterator[tuple[str, float]]:
    """`spawn_server`, yielding just (base URL, seconds to ready)."""
    with spawn_server(model, variants, config, extra_env, log_path) as server:
        yield server.url, server.ready_s
