"""Import openai-whisper without importing numba, which only word timing needs.

`import whisper` imports `whisper.timing`, whose two DTW helpers are decorated with
`@numba.jit` at import time, so every process that touches whisper pays numba and llvmlite:
about 56 MB of resident memory (measured here: `import torch` 224 MB, `+ numba` 280 MB), for a
feature most requests never use (`timestamp_granularities[]=word`).

`import_whisper()` imports whisper with a stand-in `numba` module whose `jit` only records the
function and its options. The first call of either helper imports the real numba, jits every
recorded function of that module and puts the real dispatchers back into the module's globals
(numba resolves `dtw_cpu`'s call to `backtrace` from those globals when it compiles), so from
then on whisper runs exactly its own code. The stand-in is removed from `sys.modules` as soon
as whisper is imported: anything else that imports numba gets the real one.

The price moves to the first word-timed request: importing numba and compiling DTW, about 2 s
and 130 MB of resident memory (measured: 249 MB after `import optim.engine`, 381 MB after the
first `dtw`).
"""

from __future__ import annotations

import sys
import threading
import types
from typing import Any, Callable


class _LazyJit:
    """A function awaiting `numba.jit(**options)`, compiled (with its module's others) on first call."""

    _lock = threading.Lock()

    def __init__(self, fn: Callable, options: dict[str, Any], pending: list["_LazyJit"]):
        self.fn, self.options, self._pending = fn, options, pending
        self.compiled: Callable | None = None
        pending.append(self)

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            with self._lock:
                if self.compiled is None:
                    import numba  # the real one: the stand-in is gone from sys.modules

                    for lazy in self._pending:  # in definition order: callees before callers
                        lazy.compiled = numba.jit(**lazy.options)(lazy.fn)
                        lazy.fn.__globals__[lazy.fn.__name__] = lazy.compiled
        return self.compiled(*args, **kwargs)


def _stand_in() -> types.ModuleType:
    pending: list[_LazyJit] = []
    module = types.ModuleType("numba", "stand-in installed by optim.lazy_numba while whisper is imported")

    def jit(*args, **options):
        if args and callable(args[0]):  # bare @numba.jit
            return _LazyJit(args[0], options, pending)
        return lambda fn: _LazyJit(fn, options, pending)

    module.jit = jit
    return module


def import_whisper() -> None:
    """Import whisper (once) with numba deferred; a no-op if whisper or numba is already imported."""
    if "whisper.timing" in sys.modules or "numba" in sys.modules:
        return
    sys.modules["numba"] = _stand_in()
    try:
        import whisper  # noqa: F401  (imports whisper.timing)
    finally:
        del sys.modules["numba"]


def numba_loaded() -> bool:
    return "numba" in sys.modules
