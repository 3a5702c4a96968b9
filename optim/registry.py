"""Names the model variants, decides which combinations exist, and builds and caches them.

A variant name is one or more techniques joined by `+` (`int8+flash`). Each technique is one
module in `optim/variants/` that declares itself (`TECHNIQUE`, see `optim/variants/technique.py`);
`TECHNIQUES` below lists them, and everything else follows from the declarations:

* `fp32` is the reference (no technique) and stands alone;
* at most one technique of a group (`precision`: `fp16` or `int8`);
* a technique runs only on its declared devices (`int8`: CPU, PyTorch's fbgemm kernels);
* a variant without `flash` uses eager attention, like `fp32`, so each technique's effect is
  measured on its own.

Adding a technique: write `optim/variants/<name>.py` with its transform and `TECHNIQUE`, and add
it to `TECHNIQUES` (its position is where it goes in a name).

Variants are built from the kept float32 model (a deep copy, then transforms by stage), or, for
a model that keeps none, from a private copy read for the variant (optim/models.py), and kept
under a memory budget and an idle TTL.
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from whisper.model import Whisper

from optim.errors import UnknownVariant
from optim.types import REFERENCE, ModelRef, Variant
from optim.variants import distilled, flash, fp16, int8, winograd
from optim.variants.fp32 import apply_fp32
from optim.variants.modules import nbytes
from optim.variants.technique import Technique

# The order in which a combination is spelled: distilled+int8+flash.
TECHNIQUES: tuple[Technique, ...] = (
    distilled.TECHNIQUE,
    fp16.TECHNIQUE,
    int8.TECHNIQUE,
    winograd.TECHNIQUE,
    flash.TECHNIQUE,
)
_BY_NAME = {t.name: t for t in TECHNIQUES}


def register(technique: Technique) -> None:
    """Add a technique at run time (a benchmark's baseline, an experiment), after the built-in
    ones in name order. A technique that ships belongs in `TECHNIQUES` instead."""
    global TECHNIQUES
    if technique.name in _BY_NAME:
        raise ValueError(f"technique {technique.name!r} is already registered")
    TECHNIQUES = (*TECHNIQUES, technique)
    _BY_NAME[technique.name] = technique


def parse_variant(name: str) -> Variant:
    """The canonical variant a name spells, in any order or case; UnknownVariant if it spells none."""
    parts = [p.strip() for p in name.lower().split("+") if p.strip()]
    if parts == [REFERENCE]:
        return Variant()
    if sorted(parts) == sorted([distilled.TECHNIQUE.name, REFERENCE]):  # the student in float32
        parts = [distilled.TECHNIQUE.name]
    unknown = [p for p in parts if p not in _BY_NAME]  # fp32 within a combination too
    if not parts or unknown or len(set(parts)) != len(parts):
        raise UnknownVariant(f"unknown variant {name!r}", "model")
    chosen = [_BY_NAME[p] for p in parts]
    for group, count in Counter(t.group for t in chosen if t.group).items():
        if count > 1:
            options = " or ".join(t.name for t in TECHNIQUES if t.group == group)
            raise UnknownVariant(f"variant {name!r} combines two of group {group!r}; choose {options}", "model")
    return Variant(tuple(t for t in TECHNIQUES if t in chosen))


def all_variants(device: str = "cpu", distilled: bool = False) -> list[Variant]:
    """Every valid combination on `device`, the reference first; with `distilled`, each again on
    a student. Each group is one choice (none or one member), each other technique on or off."""
    transforms = [t for t in TECHNIQUES if t.apply is not None]
    groups = list(dict.fromkeys(t.group for t in transforms if t.group))
    axes = [[None, *(t for t in transforms if t.group == g)] for g in groups]
    axes += [[None, t] for t in transforms if not t.group]
    found = []
    for choice in itertools.product(*axes):
        variant = Variant(tuple(t for t in TECHNIQUES if t in choice))
        if variant.runs_on(device):
            found.append(variant)
    if distilled:
        sources = [t for t in TECHNIQUES if t.apply is None]
        found += [Variant(tuple(t for t in TECHNIQUES if t in (*v.techniques, *sources))) for v in found]
    return found


def recommended(device: str = "cpu") -> Variant:
    """The default variant on a device. On CPU `int8+flash`: 2.1× fp32 and half the memory, with
    one activation scale per row it keeps fp32's words on clean read speech and long form
    (benchmarks/int8.md) and is batch-invariant, and a model served so is built straight from
    its stored weights (optim/models.py). `flash` is the exact choice (fp32's words to float
    rounding), by name or `DEFAULT_VARIANT=flash`. On CUDA half precision with fused attention,
    openai-whisper's own choice there."""
    return parse_variant("int8+flash" if device == "cpu" else "fp16+flash")


def build_variant(model: Whisper, variant: Variant, in_place: bool = False) -> Whisper:
    """`model` (float32) transformed into `variant`: a new model, unless `in_place` (for a
    caller that no longer needs the float32 model). For a distilled variant, pass the student.

    The new model's modules are copies, but its weights are the source's own tensors wherever
    the variant does not change them (`fp32`, `flash`, and every weight that `int8` or
    `winograd` replace by new ones), so those cost no memory; only a technique that converts
    every weight (`fp16`) copies them.
    """
    if not in_place:
        shared = {} if variant.converts_weights else {id(t): t for t in (*model.parameters(), *model.buffers())}
        model = copy.deepcopy(model, memo=shared)
    model = apply_fp32(model)  # eager attention unless a technique replaces it
    for technique in variant.transforms:
        model = technique.apply(model)
    return model.eval()


@dataclass
class BuiltVariant:
    ref: ModelRef
    model: Whisper
    build_seconds: float
    nbytes: int  # what it adds to memory: weights shared with the float32 source are not counted
    weight_bytes: int  # all its weights and buffers, shared or not
    last_used: float = field(default_factory=time.monotonic)

    @property
    def half_compute(self) -> bool:
        """Computes in float16: half-precision weights on a device with fast float16 (CUDA)."""
        return self.ref.variant.half_precision and self.model.device.type == "cuda"


class VariantCache:
    """Built variants by model reference, least recently used first out.

    The budget counts the memory each variant adds: weights it shares with a kept float32 source
    are not counted; a variant built from a private copy counts all of its weights. A variant idle longer than `idle_ttl` seconds is dropped at the
    next use of the cache; `pinned` variants (preloaded by setting) are never dropped.
    """

    def __init__(self, budget_bytes: int, idle_ttl: float | None = None):
        self.budget_bytes = budget_bytes
        self.idle_ttl = idle_ttl
        self.pinned: set[ModelRef] = set()
        self._built: OrderedDict[ModelRef, BuiltVariant] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[ModelRef, threading.Lock] = {}

    def get(self, key: ModelRef, source: Callable[[], tuple[Whisper, bool]]) -> BuiltVariant:
        """The built variant, building it on first use (one build per key) from `source()`: the
        model to build from, and whether it is a private copy to transform in place."""
        with self._lock:
            built = self._built.get(key)
            if built is not None:
                built.last_used = time.monotonic()
                self._built.move_to_end(key)
                return built
            build_lock = self._building.setdefault(key, threading.Lock())
        with build_lock:  # one build per key, others wait for it
            with self._lock:
                if key in self._built:
                    return self._built[key]
            start = time.perf_counter()
            base, private = source()
            model = build_variant(base, key.variant, in_place=private)
            own_bytes = nbytes(model, shared_with=None if private else base)  # what this variant adds to memory
            del base
            built = BuiltVariant(key, model, time.perf_counter() - start, own_bytes, nbytes(model))
            with self._lock:
                self._built[key] = built
                self._evict(keep=key)
            return built

    def built(self) -> list[BuiltVariant]:
        with self._lock:
            return list(self._built.values())

    def used_bytes(self) -> int:
        return sum(b.nbytes for b in self.built())

    def is_built(self, key: ModelRef) -> bool:
        with self._lock:
            return key in self._built

    def _evict(self, keep: ModelRef | None) -> None:
        now = time.monotonic()
        for key, built in list(self._built.items()):
            if key in self.pinned or key == keep:
                continue
            idle = self.idle_ttl is not None and now - built.last_used > self.idle_ttl
            over = sum(b.nbytes for b in self._built.values()) > self.budget_bytes
            if idle or (over and built.nbytes > 0):  # dropping a variant that adds nothing frees nothing
                del self._built[key]

    def clear(self) -> None:
        with self._lock:
            self._built.clear()
            self.pinned.clear()

    def expire_idle(self) -> None:
        with self._lock:
            self._evict(keep=None)
