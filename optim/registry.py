"""Names the model variants, decides which combinations exist, and builds and caches them.

A variant name is one or more techniques joined by `+` (`int8+flash`). Rules:

* `fp32` is the reference and stands alone;
* at most one precision (`fp16` or `int8`); `int8` is CPU-only (PyTorch's fbgemm kernels);
* `winograd` and `flash` combine with either precision;
* a variant without `flash` uses eager attention, like `fp32`, so each technique's effect is
  measured on its own.

Variants are built from the already-loaded float32 model (a deep copy, then transforms in a
fixed order), never re-read from disk, and kept under a memory budget and an idle TTL.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from whisper.model import Whisper

from optim.variants.flash import apply_flash
from optim.variants.fp16 import apply_fp16
from optim.variants.fp32 import apply_fp32
from optim.variants.int8 import apply_int8
from optim.variants.modules import nbytes
from optim.variants.winograd import apply_winograd

# Applied in this order: convolution and attention rewrites need float32 weights in place,
# precision changes come last.
TECHNIQUES: dict[str, Callable[[Whisper], Whisper]] = {
    "winograd": apply_winograd,
    "flash": apply_flash,
    "fp16": apply_fp16,
    "int8": apply_int8,
}
PRECISIONS = ("fp16", "int8")
REFERENCE = "fp32"
# Not a transform: the variant runs a distilled student (optim/student.py) in place of the model,
# with any other techniques applied to the student.
DISTILLED = "distilled"
NAME_ORDER = (DISTILLED, "fp16", "int8", "winograd", "flash")  # how combinations are spelled: distilled+int8+flash


class UnknownVariant(ValueError):
    pass


def parse_variant(name: str) -> tuple[str, ...]:
    """Validate a variant name and return its techniques in canonical order."""
    parts = [p.strip() for p in name.lower().split("+") if p.strip()]
    if parts == [REFERENCE]:
        return ()
    if parts == [DISTILLED, REFERENCE] or parts == [REFERENCE, DISTILLED]:  # the student in float32
        return (DISTILLED,)
    unknown = [p for p in parts if p not in TECHNIQUES and p != DISTILLED]
    if not parts or unknown or len(set(parts)) != len(parts):
        raise UnknownVariant(f"unknown variant {name!r}")
    if sum(p in PRECISIONS for p in parts) > 1:
        raise UnknownVariant(f"variant {name!r} combines two precisions; choose fp16 or int8")
    return tuple(t for t in (DISTILLED, *TECHNIQUES) if t in parts)


def is_distilled(name: str) -> bool:
    return DISTILLED in parse_variant(name)


def canonical(name: str) -> str:
    techniques = parse_variant(name)
    return "+".join(t for t in NAME_ORDER if t in techniques) or REFERENCE


def all_variants(device: str = "cpu", distilled: bool = False) -> list[str]:
    """Every valid combination, the reference first; with `distilled`, each again on a student."""
    if distilled:
        return [*all_variants(device), *(canonical(f"{DISTILLED}+{v}") for v in all_variants(device))]  # fp32 → distilled
    names = [REFERENCE]
    for precision in (None, *PRECISIONS):
        if precision == "int8" and device != "cpu":
            continue
        for winograd in (False, True):
            for flash in (False, True):
                parts = [p for p, on in (("winograd", winograd), ("flash", flash), (precision, precision)) if on]
                if parts:
                    names.append(canonical("+".join(parts)))
    return names


def recommended(device: str = "cpu") -> str:
    """The fastest combination that keeps accuracy (benchmarks/variants.md). On CPU that is
    `flash`: exact, 1.3× fp32. `int8+flash` is 2.8× but costs base 0.8 WER points, more than
    the 0.5 we accept for a default (tiny.en loses nothing): clients ask for it by name. On
    CUDA half precision with fused attention, openai-whisper's own choice there."""
    return "flash" if device == "cpu" else "fp16+flash"


def build_variant(model: Whisper, name: str, in_place: bool = False) -> Whisper:
    """`model` (float32) transformed into variant `name`: a new model, unless `in_place`
    (for a caller that no longer needs the float32 model).

    The new model's modules are copies, but its weights are the source's own tensors wherever
    the variant does not change them (`fp32`, `flash`, and every weight that `int8` or
    `winograd` replace by new ones), so those cost no memory; only `fp16`, which converts the
    weights themselves, copies them.
    """
    if not in_place:
        shared = {} if "fp16" in parse_variant(name) else {id(t): t for t in (*model.parameters(), *model.buffers())}
        model = copy.deepcopy(model, memo=shared)
    variant = apply_fp32(model)  # eager attention unless `flash` replaces it
    for technique in parse_variant(name):
        if technique != DISTILLED:  # the caller passes the student itself as `model`
            variant = TECHNIQUES[technique](variant)
    return variant.eval()


@dataclass
class BuiltVariant:
    model_id: str
    variant: str
    model: Whisper
    build_seconds: float
    nbytes: int  # what it adds to memory: weights shared with the float32 source are not counted
    weight_bytes: int  # all its weights and buffers, shared or not
    last_used: float = field(default_factory=time.monotonic)

    @property
    def fp16_compute(self) -> bool:
        return "fp16" in self.variant and self.model.device.type == "cuda"


class VariantCache:
    """Built variants by (model id, variant), least recently used first out.

    The budget counts the memory each variant adds: weights it shares with its float32 source
    (always loaded) are not counted. A variant idle longer than `idle_ttl` seconds is dropped at the
    next use of the cache; `pinned` variants (preloaded by setting) are never dropped.
    """

    def __init__(self, budget_bytes: int, idle_ttl: float | None = None):
        self.budget_bytes = budget_bytes
        self.idle_ttl = idle_ttl
        self.pinned: set[tuple[str, str]] = set()
        self._built: OrderedDict[tuple[str, str], BuiltVariant] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[tuple[str, str], threading.Lock] = {}

    def get(self, model_id: str, source: Whisper, variant: str) -> BuiltVariant:
        key = (model_id, canonical(variant))
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
            model = build_variant(source, key[1])
            own_bytes = nbytes(model, shared_with=source)  # what this variant adds to memory
            built = BuiltVariant(model_id, key[1], model, time.perf_counter() - start, own_bytes, nbytes(model))
            with self._lock:
                self._built[key] = built
                self._evict(keep=key)
            return built

    def built(self) -> list[BuiltVariant]:
        with self._lock:
            return list(self._built.values())

    def used_bytes(self) -> int:
        return sum(b.nbytes for b in self.built())

    def _evict(self, keep: tuple[str, str]) -> None:
        now = time.monotonic()
        for key, built in list(self._built.items()):
            if key in self.pinned or key == keep:
                continue
            idle = self.idle_ttl is not None and now - built.last_used > self.idle_ttl
            over = sum(b.nbytes for b in self._built.values()) > self.budget_bytes
            if idle or (over and built.nbytes > 0):  # dropping a variant that adds nothing frees nothing
                del self._built[key]

    def expire_idle(self) -> None:
        with self._lock:
            self._evict(keep=("", ""))
