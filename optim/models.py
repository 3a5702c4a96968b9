"""The models a server holds: which can be served, loading them (once, from any thread), their
distilled students and their built variants.

What stays in memory follows the default variant. A float one (`flash`) shares the float32
model's weights, so that model is kept, and the other variants are built from it. One that holds
its own weights (`int8`) is built at load time straight from the weights as stored (float16 for
the bundled models), and no float32 copy is kept: a request for a float variant then reads its
own float32 copy from disk, and the variant budget counts all of it.

This is also the one place where a request's model and variant names become a `ModelRef`
(`ref()`): everything below works on that typed reference and never parses a name again.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import torch
from whisper.model import ModelDimensions, Whisper

from optim.errors import ModelNotReady, UnknownModel, UnknownVariant, VariantBuildsLimited, VariantNotOnDemand, VariantUnavailable
from optim.memory import release_freed_memory
from optim.registry import BuiltVariant, VariantCache, all_variants, parse_variant, recommended
from optim.student import load_student, share_with_teacher, student_path
from optim.types import ModelRef, Variant
from optim.weights import load_whisper

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    id: str
    dims: ModelDimensions
    device: str
    load_seconds: float
    # The float32 model float variants share their weights with; None when the default variant
    # holds its own weights (int8): nothing then keeps a float32 copy (module doc).
    float_source: Whisper | None

    @property
    def multilingual(self) -> bool:  # as openai-whisper's Whisper.is_multilingual
        return self.dims.n_vocab >= 51865

    @property
    def num_languages(self) -> int:  # as Whisper.num_languages
        return self.dims.n_vocab - 51765 - int(self.multilingual)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class ModelStore:
    """Models by id, loaded on first use or at start-up (`load_startup`), and their variants."""

    def __init__(
        self,
        sources: dict[str, str | Path],
        device: str = "auto",
        variants: list[str] | None = None,
        variant_budget_bytes: int = 2**30,
        variant_idle_ttl: float | None = None,
        models_dir: Path | None = None,
        default_variant: str = "auto",
        startup: list[str] | None = None,
        startup_variants: list[str] | None = None,
        on_demand: list[str] | None = None,
        builds_per_minute: int | None = None,
    ):
        self.sources = dict(sources)  # id -> bundled name or path; everything that can be served
        self.device = resolve_device(device)
        self.models_dir = models_dir  # where distilled students live (MODELS_DIR/distilled/<model>.pt)
        valid = all_variants(self.device, distilled=True)
        self.variants: list[Variant] = [parse_variant(v) for v in variants] if variants else valid
        unavailable = [str(v) for v in self.variants if v not in valid]
        if unavailable:
            raise ValueError(f"variants {unavailable} are not available on {self.device}; available: {', '.join(map(str, valid))}")
        self.default_variant = recommended(self.device) if default_variant == "auto" else self.variant(default_variant)
        if self.default_variant not in self.variants:
            raise ValueError(f"the default variant {self.default_variant} is not served")
        self.variant_cache = VariantCache(variant_budget_bytes, variant_idle_ttl)
        self._models: dict[str, LoadedModel] = {}
        self._students: dict[str, Whisper] = {}
        self._load_lock = threading.Lock()
        self._errors: dict[str, str] = {}  # what failed to load ("model" or "model:variant") and why
        self.startup = list(startup or [])  # loaded by load_startup; until then a request gets ModelNotReady
        unknown = [m for m in self.startup if m not in self.sources]
        if unknown:
            raise ValueError(f"start-up models {unknown} are not served; served: {', '.join(self.sources)}")
        self.startup_variants: list[ModelRef] = []  # built by load_startup, never evicted
        for name in startup_variants or []:
            model_id, _, variant = name.partition(":")
            if model_id not in self.sources:
                raise ValueError(f"start-up variant {name!r} names model {model_id!r}, which is not served")
            self.startup_variants.append(self.ref(model_id, self.variant(variant) if variant else None, check_ready=False))
        # Building a variant costs seconds of CPU and its memory: which may be built when a
        # request first asks (None: every served one), and how many distinct builds per model a
        # minute. The default variant and the start-up ones are always there.
        self.on_demand: list[Variant] | None = None if on_demand is None else [self.variant(v) for v in on_demand]
        self.builds_per_minute = builds_per_minute
        self._recent_builds: dict[str, deque[tuple[float, ModelRef]]] = defaultdict(deque)
        self._builds_lock = threading.Lock()

    # ---------------------------------------------------------------- names → references
    def variant(self, name: str) -> Variant:
        """The served variant a name spells; UnknownVariant (listing the served ones) otherwise."""
        valid = f"valid variants: {', '.join(map(str, self.variants))}"
        try:
            variant = parse_variant(name)
        except UnknownVariant as e:
            raise UnknownVariant(f"{e}; {valid}", "model") from e
        if variant not in self.variants:
            raise UnknownVariant(f"variant {name!r} is not served; {valid}", "model")
        return variant

    def ref(self, model_id: str, variant: Variant | None = None, check_ready: bool = True) -> ModelRef:
        """The reference for a served model id and variant (None: the default variant):
        UnknownModel, or ModelNotReady while a start-up model is still loading (or failed)."""
        if model_id not in self.sources:
            raise self.unknown(model_id)
        chosen = self.default_variant if variant is None else variant
        if check_ready and model_id in self.startup and model_id not in self._models:
            reason = self._errors.get(model_id)
            message = f"model {model_id!r} failed to load: {reason}" if reason else f"model {model_id!r} is still loading"
            raise ModelNotReady(message, "model", retry_after=5)
        return ModelRef(model_id, chosen)

    def unknown(self, name: str) -> UnknownModel:
        """The one answer to a name that is no model here."""
        return UnknownModel(
            f"model {name!r} does not exist; available: {', '.join(self.sources)} (optionally as model:variant; "
            "GET /v1/models lists every name)",
            "model",
        )

    # ---------------------------------------------------------------- loading
    @property
    def loaded(self) -> dict[str, LoadedModel]:
        return dict(self._models)

    @property
    def load_errors(self) -> dict[str, str]:
        return dict(self._errors)

    def load(self, model_id: str) -> LoadedModel:
        """Load (once) and return a model; safe to call from several threads."""
        if model_id in self._models:
            return self._models[model_id]
        if model_id not in self.sources:
            raise self.unknown(model_id)
        with self._load_lock:
            if model_id in self._models:
                return self._models[model_id]
            start = time.perf_counter()
            default = ModelRef(model_id, self.default_variant)
            keep_float = not default.variant.own_weights
            try:
                model = self._read(model_id, float32=keep_float)
                if not keep_float and not default.variant.distilled:  # the default, straight from the stored weights
                    self.variant_cache.pinned.add(default)
                    self.variant_cache.get(default, lambda: (model, True))
            except Exception as e:  # keep the reason for /ready and for requests
                self._errors[model_id] = f"{type(e).__name__}: {e}"
                raise
            loaded = LoadedModel(
                id=model_id,
                dims=model.dims,
                device=self.device,
                load_seconds=time.perf_counter() - start,
                float_source=model if keep_float else None,
            )
            release_freed_memory()
            self._models[model_id] = loaded
            self._errors.pop(model_id, None)
            log.info("loaded %s on %s in %.2f s", model_id, self.device, loaded.load_seconds)
            return loaded

    def load_startup(self) -> None:
        """Load the start-up models and build the start-up variants; a failure is logged and kept
        (`load_errors`, /ready), never raised: the other models still serve."""
        for model_id in self.startup:
            try:
                self.load(model_id)
            except Exception:
                log.exception("could not load model %s", model_id)
        for ref in self.startup_variants:
            try:
                self.preload_variant(ref)
            except Exception as e:
                self._errors[str(ref)] = f"{type(e).__name__}: {e}"
                log.exception("could not build variant %s", ref)

    def preload_variant(self, ref: ModelRef) -> None:
        """Build a variant now and keep it regardless of budget and TTL."""
        self.check_student(ref)
        self.variant_cache.pinned.add(ref)
        self.variant_cache.get(ref, lambda: self._source(ref))

    @property
    def ready(self) -> bool:
        return all(m in self._models for m in self.startup) and all(self.variant_cache.is_built(r) for r in self.startup_variants)

    def readiness(self) -> dict:
        """What /ready reports: each start-up model and variant, load times and errors."""
        errors = self.load_errors
        loaded = self.loaded
        return {
            "status": "ready" if self.ready else "failed" if errors else "loading",
            "models": {m: "loaded" if m in loaded else "failed" if m in errors else "loading" for m in self.startup},
            "variants": {str(r): "built" if self.variant_cache.is_built(r) else "building" for r in self.startup_variants},
            "load_seconds": {m: round(loaded[m].load_seconds, 2) for m in self.startup if m in loaded},
            "errors": errors,
        }

    def close(self) -> None:
        """Drop every model and built variant: their memory goes once no running batch holds them."""
        with self._load_lock:
            self._models.clear()
        self.variant_cache.clear()

    # ---------------------------------------------------------------- distilled students
    def student_file(self, model_id: str) -> Path | None:
        """The student checkpoint of `model_id`, if one was built (python -m optim.distill)."""
        path = student_path(self.models_dir, model_id) if self.models_dir is not None else None
        return path if path is not None and path.is_file() else None

    def check_student(self, ref: ModelRef) -> None:
        """VariantUnavailable for a distilled variant whose student was never built."""
        if ref.variant.distilled and ref.model not in self._students and self.student_file(ref.model) is None:
            where = student_path(self.models_dir or Path("models"), ref.model)
            raise VariantUnavailable(
                f"variant {str(ref.variant)!r} needs a distilled student of {ref.model!r} at {where}, and there is none; "
                f"build it with `python -m optim.distill --teacher {ref.model}`",
                "model",
            )

    def check_build(self, ref: ModelRef) -> None:
        """Before any audio work: refuse a variant that would have to be built and may not be
        (VariantNotOnDemand), or not yet (VariantBuildsLimited: this model's builds in the last
        minute are at the limit). A refused request costs nothing; a variant cycled to evict
        and rebuild the others is bounded to `builds_per_minute` builds."""
        if ref.variant == self.default_variant or ref in self.startup_variants or self.variant_cache.is_built(ref):
            return
        if self.on_demand is not None and ref.variant not in self.on_demand:
            allowed = ", ".join(map(str, [self.default_variant, *self.on_demand]))
            raise VariantNotOnDemand(f"variant {str(ref.variant)!r} is not built on demand here (ON_DEMAND_VARIANTS); ask for one of: {allowed}", "model")
        if self.builds_per_minute is None:
            return
        now = time.monotonic()
        with self._builds_lock:
            recent = self._recent_builds[ref.model]
            while recent and now - recent[0][0] > 60:
                recent.popleft()
            if any(r == ref for _, r in recent):
                return  # counted already (being built, or evicted since)
            if len(recent) >= self.builds_per_minute:
                raise VariantBuildsLimited(ref.model, self.builds_per_minute, math.ceil(60 - (now - recent[0][0])))
            recent.append((now, ref))

    def _read(self, model_id: str, float32: bool) -> Whisper:
        """The model's weights from disk: float32, or as stored (for a variant with its own weights)."""
        return load_whisper(self.sources[model_id], torch.float32 if float32 else None).to(self.device)

    def source(self, ref: ModelRef) -> Whisper:
        """A model to build `ref`'s variant from (`build_variant`): see `_source`."""
        return self._source(ref)[0]

    def _source(self, ref: ModelRef) -> tuple[Whisper, bool]:
        """What a variant is built from, and whether it is a private copy to transform in place:
        the kept float32 model; else the weights read from disk for this variant alone; for
        `distilled`, the student (loaded once, sharing the teacher's kept weights)."""
        loaded = self.load(ref.model)
        if not ref.variant.distilled:
            if loaded.float_source is not None:
                return loaded.float_source, False
            return self._read(ref.model, float32=not ref.variant.own_weights), True
        with self._load_lock:
            if ref.model not in self._students:
                student, record = load_student(self.student_file(ref.model))
                if record.get("teacher") not in (None, ref.model):
                    log.warning("student of %s was distilled from %s", ref.model, record.get("teacher"))
                student = student.to(self.device)
                if loaded.float_source is not None:  # its frozen encoder and embeddings
                    shared = share_with_teacher(student, loaded.float_source)
                    log.info("loaded the distilled student of %s (%.0f MB shared with it)", ref.model, shared / 2**20)
                self._students[ref.model] = student
            return self._students[ref.model], False

    def built(self, ref: ModelRef) -> BuiltVariant:
        """The variant ready to run, built on first use; idle variants expire meanwhile."""
        # Load first, outside the variant's build lock: loading builds the default variant under
        # that same lock (an int8 default straight from the stored weights), which deadlocked a
        # first built() of the default variant on a store not loaded yet.
        self.load(ref.model)
        built = self.variant_cache.get(ref, lambda: self._source(ref))
        self.variant_cache.expire_idle()
        return built

