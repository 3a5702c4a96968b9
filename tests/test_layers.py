"""The architecture's invariants (ARCHITECTURE.md), checked on the source itself:

1. imports run one way: benchmarks → app → optim; loadtest imports neither app nor optim;
   optim imports no web or metrics library;
2. no import circles, type-only imports included;
3. below the router a variant is one canonical ModelRef, parsed once; a technique is one file
   in optim/variants/ plus one registry entry, and the rest follows from its declaration;
4. only app/errors.py maps error kinds to HTTP statuses.
(5, the batching policy as a pure function, is tests/test_policy.py.)
"""

from __future__ import annotations

import ast
import inspect
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "optim", "benchmarks", "loadtest")
# ray: the Ray Serve shell lives in app/ray/; the library runs the same without a cluster
WEB_OR_METRICS = ("fastapi", "starlette", "uvicorn", "multipart", "prometheus_client", "httpx", "openai", "pydantic_settings", "ray")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


SOURCES = _sources()


def _imports(module: str) -> set[str]:
    """Every module `module` imports, at any level of its code (inside functions, under
    TYPE_CHECKING): absolute names, `from X import Y` resolved to X.Y when that is a module."""
    path = SOURCES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in SOURCES}
    return found


def _top(name: str) -> str:
    return name.split(".")[0]


IMPORTS = {module: _imports(module) for module in SOURCES}
ALLOWED = {  # what each layer may import of ours
    "benchmarks": {"benchmarks", "app", "optim", "loadtest"},
    "app": {"app", "optim"},
    "optim": {"optim"},
    "loadtest": {"loadtest"},
}


def test_the_scan_sees_the_code():
    """Guard against a scan that finds nothing and so passes: known edges must be there."""
    assert {"app.main", "optim.engine", "optim.scheduler.policy", "benchmarks.variants", "loadtest.cli"} <= set(SOURCES)
    assert "optim.engine" in IMPORTS["optim.scheduler.core"]
    assert "optim.fallback" in IMPORTS["optim.engine"]  # `from optim import fallback`
    assert "fastapi" in IMPORTS["app.main"]


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_imports_run_one_way(module):
    ours = {_top(name) for name in IMPORTS[module] if _top(name) in PACKAGES}
    assert ours <= ALLOWED[_top(module)], f"{module} imports {sorted(ours - ALLOWED[_top(module)])}"


@pytest.mark.parametrize("module", sorted(m for m in SOURCES if _top(m) == "optim"))
def test_the_library_imports_no_web_or_metrics_library(module):
    web = sorted(name for name in IMPORTS[module] if _top(name) in WEB_OR_METRICS)
    assert not web, f"{module} imports {web}"


def test_no_import_circles():
    graph = {m: {i for i in IMPORTS[m] if i in SOURCES and i != m} for m in SOURCES}
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = path[path.index(target) :] + [target]
                pytest.fail("import circle: " + " → ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


# ---------------------------------------------------------------- 3. variants


def _calls(module: str, name: str) -> int:
    tree = ast.parse(SOURCES[module].read_text())
    return sum(
        isinstance(n, ast.Call) and (getattr(n.func, "id", None) == name or getattr(n.func, "attr", None) == name)
        for n in ast.walk(tree)
    )


def test_variant_names_are_parsed_in_one_place():
    """Only the model store turns a name into a variant (`ModelStore.variant`, plus the VARIANTS
    setting at start-up); the router calls that; nothing else in app/ or optim/ parses a name."""
    parsing = {m for m in SOURCES if _top(m) in ("app", "optim") and _calls(m, "parse_variant")}
    assert parsing == {"optim.models", "optim.registry", "optim.distill"}, parsing
    # the registry's own call is `recommended`; distill names its teacher's labelling variant
    assert _calls("optim.registry", "parse_variant") == 1 and _calls("optim.distill", "parse_variant") == 1
    asking = {m for m in SOURCES if _top(m) == "app" and _calls(m, "variant")}
    assert asking == {"app.service"}, asking


def test_a_request_parses_its_variant_once(monkeypatch, tmp_path):
    """Count the parses while one request travels from the router to the engine: one, and every
    layer below the router receives the same ModelRef."""
    from fastapi.testclient import TestClient

    import optim.models
    from app.main import create_app
    from app.settings import Settings
    from optim.types import ModelRef

    parsed, seen = [], []
    real_parse = optim.models.parse_variant
    monkeypatch.setattr(optim.models, "parse_variant", lambda name: parsed.append(name) or real_parse(name))
    app = create_app(Settings(models=["tiny.en"], default_model="tiny.en", models_dir=tmp_path))
    engine = app.state.service.engine
    real_check = engine.check
    monkeypatch.setattr(engine, "check", lambda ref, options: seen.append(ref) or real_check(ref, options))
    with TestClient(app) as client:
        for _ in range(600):  # the model loads in the background
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.1)
        parsed.clear()  # start-up parses its settings once; from here on only the request counts
        response = client.post(
            "/v1/audio/transcriptions",
            files={"file": ("jfk.flac", (ROOT / "tests" / "data" / "jfk.flac").read_bytes())},
            data={"model": "tiny.en:FLASH+int8", "language": "en"},
        )
    assert response.status_code == 200, response.text
    assert response.headers["X-Model"] == "tiny.en:int8+flash"
    assert parsed == ["FLASH+int8"]
    assert seen and all(isinstance(r, ModelRef) and str(r) == "tiny.en:int8+flash" for r in seen)


def test_a_technique_is_one_module_and_one_registry_entry():
    from optim import registry, variants

    modules = {p.stem for p in Path(variants.__file__).parent.glob("*.py")} - {"__init__", "modules", "technique", "fp32"}
    declared = {t.name for t in registry.TECHNIQUES}
    assert declared == modules  # every technique module is registered, and nothing else is
    for technique in registry.TECHNIQUES:
        module = __import__(f"optim.variants.{technique.name}", fromlist=["TECHNIQUE"])
        assert module.TECHNIQUE is technique


def test_combinations_precision_and_attention_follow_from_declarations(monkeypatch):
    """A new technique declared and registered, and nothing else changed: it is listed in every
    valid combination, spelled in registry order, and its declaration drives the decoder."""
    from optim import registry
    from optim.variants.technique import Technique

    before = registry.all_variants("cpu")
    fused = Technique("sparse", lambda model: model, stage=1, fused_attention=True)
    monkeypatch.setattr(registry, "TECHNIQUES", (*registry.TECHNIQUES, fused))
    monkeypatch.setattr(registry, "_BY_NAME", {t.name: t for t in registry.TECHNIQUES})
    after = registry.all_variants("cpu")
    assert len(after) == 2 * len(before)
    assert registry.parse_variant("sparse+int8").name == "int8+sparse"
    assert registry.parse_variant("sparse").fused_attention and not registry.parse_variant("winograd").fused_attention
    assert registry.parse_variant("fp16+sparse").half_precision


# ---------------------------------------------------------------- 4. statuses


def _status_literals(module: str) -> list[int]:
    """Integers 400-599 outside tuples (histogram buckets are tuples of numbers, not statuses)."""
    tree = ast.parse(SOURCES[module].read_text())
    in_tuples = {id(e) for n in ast.walk(tree) if isinstance(n, ast.Tuple) for e in n.elts}
    return [
        n.value for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and type(n.value) is int and 400 <= n.value < 600 and id(n) not in in_tuples
    ]


def test_only_the_error_table_knows_http_statuses():
    """No 4xx/5xx literal in app/ outside app/errors.py, and none named a status in optim/ (whose
    numbers 400-599 are frame counts and the like, never statuses)."""
    app_literals = {m: _status_literals(m) for m in SOURCES if _top(m) == "app" and m != "app.errors"}
    assert not any(app_literals.values()), {m: v for m, v in app_literals.items() if v}
    for module in (m for m in SOURCES if _top(m) == "optim"):
        tree = ast.parse(SOURCES[module].read_text())
        names = {getattr(n, a) for n in ast.walk(tree) for a in ("id", "attr", "arg") if isinstance(getattr(n, a, None), str)}
        assert not {n for n in names if "status" in n.lower()}, module


def test_every_error_kind_has_a_status():
    from app import errors, limits
    from optim import errors as kinds

    assert set(errors.STATUS) == set(kinds.Kind)
    classes = [c for m in (kinds, limits) for _, c in inspect.getmembers(m, inspect.isclass) if issubclass(c, kinds.ServiceError)]
    assert len(classes) >= 12
    for cls in classes:
        assert isinstance(cls.kind, kinds.Kind) and cls.code, cls
