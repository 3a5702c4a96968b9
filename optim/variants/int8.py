"""`int8`: dynamic INT8 quantization of every linear layer, the output projection included.

Weights are stored as int8 with one scale per output channel (per-tensor scales changed 3 of
116 words on the test clips; per-channel none); activations are quantized on the fly per call,
and the matmul runs in int8 with int32 accumulation (PyTorch's fbgemm/x86 kernels). Measured on
this 2-core AVX-512 CPU for base's (512 → 51865) logits projection at batch 1: float32 9.7 ms,
int8 0.36 ms; torchao 0.18's int8 configs took 34–40 ms on CPU, so PyTorch's own dynamic
quantization is the path used.

Two traps in openai-whisper: its `Linear` is a subclass, which `quantize_dynamic` skips (it
matches exact types), so those layers are turned into plain `nn.Linear` first; and the logits
are `x @ token_embedding.weight.T`, not a layer at all, so an int8 `Linear` over the embedding
matrix is added as the decoder's output projection. The token embedding itself (used for
look-ups only after that) is stored as int8 rows with one scale per row, which saves a further
3/4 of the largest matrix.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
from whisper.model import Whisper

from optim.memory import release_freed_memory
from optim.variants.modules import use_variant_decoder
from optim.variants.technique import Technique


class Int8Embedding(nn.Module):
    """Embedding rows stored as int8 with a per-row scale; a look-up dequantizes only its rows."""

    def __init__(self, weight: Tensor):
        super().__init__()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
        self.register_buffer("qweight", weight.div(scale).round_().to(torch.int8))  # one temporary
        self.register_buffer("scale", scale.float())

    def forward(self, tokens: Tensor) -> Tensor:
        return self.qweight[tokens].float() * self.scale[tokens]


def apply_int8(model: Whisper) -> Whisper:
    if model.device.type != "cpu":
        raise ValueError("int8 uses PyTorch's CPU kernels (fbgemm); on CUDA use fp16")
    decoder = use_variant_decoder(model)
    embedding = decoder.token_embedding.weight.detach()
    with torch.device("meta"):  # no weights allocated: it adopts the embedding matrix (tied)
        output = nn.Linear(embedding.shape[1], embedding.shape[0], bias=False)
    output.weight = nn.Parameter(embedding, requires_grad=False)
    decoder.output_projection = output
    for module in model.modules():
        if isinstance(module, nn.Linear) and type(module) is not nn.Linear:
            module.__class__ = nn.Linear  # openai-whisper's subclass only adds dtype casting
    with warnings.catch_warnings():
        # torch.ao's eager quantization is deprecated in favour of torchao, whose int8 kernels
        # are two orders of magnitude slower on this CPU (module doc); keep it, quietly.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    decoder.token_embedding = Int8Embedding(embedding)
    del embedding
    release_freed_memory()
    return model


TECHNIQUE = Technique("int8", apply_int8, stage=2, group="precision", devices=("cpu",))
