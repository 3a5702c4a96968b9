"""The engine library. Importing any part of it imports openai-whisper with numba deferred to
the first word-timed request (optim/lazy_numba.py)."""

from optim.lazy_numba import import_whisper

import_whisper()
