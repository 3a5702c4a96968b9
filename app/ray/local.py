"""A throw-away Ray cluster on this machine, for tests/test_ray.py and benchmarks/ray_serve.py:
a head and optional extra nodes on loopback under a temp dir of its own, `python -m app.ray` on
it, and a teardown that kills exactly the processes it started. Never `ray stop`: it kills
every Ray process on the machine, other users' included."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
CLI_TIMEOUT_S = 90  # every Ray CLI call is bounded: a wedged `ray start` must not hang a test run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        found[int(entry.name)] = (parent, cmdline)
    return found


class LocalCluster:
    def __init__(self, nodes: int = 1, cpus_per_node: int = 1):
        self.temp = Path(tempfile.mkdtemp(prefix="wsray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
        self.head_port = free_port()
        self.http_port = free_port()
        self.address = f"127.0.0.1:{self.head_port}"
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.nodes = nodes
        self.cpus = cpus_per_node
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
        self.env.pop("RAY_ADDRESS", None)
        self.driver: subprocess.Popen | None = None
        self.log = self.temp / "app.log"

    # Ray's daemons detach from us but carry the temp dir or the head's address in their command
    # line; its workers retitle themselves ("ray::ServeReplica...") but are children of a raylet.
    @property
    def markers(self) -> list[str]:
        return [str(self.temp), f":{self.head_port} "]

    def _cli(self, *args: str) -> None:
        result = subprocess.run(["timeout", str(CLI_TIMEOUT_S), RAY, *args], env=self.env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")

    def start(self) -> "LocalCluster":
        common = ["--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--num-cpus", str(self.cpus)]

        def ports(*names: str) -> list[str]:  # Ray's fixed default ports, moved: another Ray here keeps its own
            return [arg for name in names for arg in (f"--{name}", str(free_port()))]

        self._cli("start", "--head", "--port", str(self.head_port), "--temp-dir", str(self.temp), "--include-dashboard=false", *common,
                  *ports("ray-client-server-port", "dashboard-agent-listen-port", "metrics-export-port", "runtime-env-agent-port"))
        for _ in range(self.nodes - 1):
            self._cli("start", "--address", self.address, *common, *ports("dashboard-agent-listen-port", "metrics-export-port", "runtime-env-agent-port"))
        return self

    def serve(self, timeout: float = 240, **settings: str) -> str:
        """`python -m app.ray` with these settings (environment variables); the URL once /ready is 200."""
        (self.temp / "models").mkdir(exist_ok=True)
        env = {**self.env, "RAY_ADDRESS": self.address, "MODELS_DIR": str(self.temp / "models"), "SERVE_HTTP_HOST": "127.0.0.1",
               "SERVE_HTTP_PORT": str(self.http_port), **settings}
        with open(self.log, "wb") as out:  # the temp dir as an argument marks the driver as ours too
            self.driver = subprocess.Popen([sys.executable, "-m", "app.ray", str(self.temp)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.driver.poll() is not None:
                raise RuntimeError(f"python -m app.ray exited ({self.driver.returncode}):\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready in {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(1)

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"

    def processes(self) -> set[int]:
        """Every process this cluster started, and their descendants."""
        table = _processes()
        ours = {pid for pid, (_, cmd) in table.items() if any(m in cmd for m in self.markers)}
        if self.driver is not None and self.driver.pid in table:
            ours.add(self.driver.pid)
        while children := {pid for pid, (parent, _) in table.items() if parent in ours} - ours:
            ours |= children
        return ours - {os.getpid()}

    def stop(self) -> set[int]:
        """Kill every process of this cluster; the ones still there after (none, normally)."""
        for _ in range(5):  # a dying raylet may still start a worker: sweep until none is left
            pids = self.processes()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        if self.driver is not None:
            self.driver.wait(timeout=10)
        left = self.processes()
        shutil.rmtree(self.temp, ignore_errors=True)
        return left
