"""`fp16`: half-precision weights.

On CUDA the weights are float16 and the model computes in float16 (openai-whisper's
`fp16=True`), with LayerNorm parameters kept in float32 because openai-whisper's LayerNorm
computes in float32.

On CPU half-precision arithmetic is slow (openai-whisper's fp16 decoding runs ~3× slower than
fp32 here), so this variant does what a CPU can do honestly: the weights are *stored* in
float16 — half the memory — and openai-whisper's layers upcast them to float32 when they are
used, so the arithmetic is float32. It saves memory, not time; the benchmark reports both.
"""

from __future__ import annotations

from whisper.model import LayerNorm, Whisper

from optim.variants.modules import use_variant_decoder
from optim.variants.technique import Technique


def apply_fp16(model: Whisper) -> Whisper:
    use_variant_decoder(model)
    keep_fp32 = {id(p) for m in model.modules() if isinstance(m, LayerNorm) for p in m.parameters()}
    for parameter in model.parameters():  # from float32 or from the stored float16
        parameter.data = parameter.data.float() if id(parameter) in keep_fp32 else parameter.data.half()
    return model


TECHNIQUE = Technique(
    "fp16", apply_fp16, stage=2, group="precision", half_precision=True, converts_weights=True, own_weights=True
)
