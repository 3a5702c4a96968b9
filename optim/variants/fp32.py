"""`fp32`: the reference. openai-whisper's float32 weights with eager attention (explicit
softmax, as in the paper's model), so every other variant is measured against a clean baseline."""

from __future__ import annotations

from whisper.model import Whisper

from optim.variants.modules import EagerAttention, set_attention, use_variant_decoder


def apply_fp32(model: Whisper) -> Whisper:
    set_attention(model, EagerAttention)
    use_variant_decoder(model)
    return model
