"""Model variants: each module is a transform `Whisper -> Whisper` (see optim/registry.py)."""
