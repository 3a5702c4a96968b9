"""`int8`: every linear layer in INT8, the output projection included, with one activation scale
per row, so a window's words do not depend on what shares its batch.

Weights are int8 with one scale per output channel; the matmul runs in int8 with int32
accumulation in PyTorch's fbgemm kernels (x86). Measured on this 2-core AVX-512 CPU for base's
(512 → 51865) logits projection at batch 1: float32 9.7 ms, int8 0.36 ms; torchao 0.18's int8
configs took 34–40 ms and `torch._int_mm` 3.1 ms, so fbgemm's dynamic linear is the kernel used.

**Activations, per row.** fbgemm's dynamic linear quantizes its whole input with one scale
from the input's min and max. Over a batch that couples the rows: a loud window coarsens a quiet
one's rounding, so a window's words changed with its batch-mates, and the batched WER suffered.
Here each row is first divided by its own max |x| (so it lies in [-1, 1]), and a sentinel row
[-1, 1, 0, ...] is appended, which pins fbgemm's range to [-1, 1] whatever the other rows hold:
every row is quantized with the same step relative to its own peak, the int32 products are
exact, and the output row is multiplied back by the row's scale (the bias is added after that).
A row's result is bitwise the same in any batch. `reduce_range` stays on (7-bit activations):
fbgemm needs it on CPUs without VNNI to avoid int16 saturation, and with it the results are the
same on every x86 CPU.

Measured in one run (base, `python -m benchmarks.int8`, benchmarks/int8.md), WER change against
fp32 and speed against fp32, per-row here / per-tensor before: en_read +0.17 / +1.51 points at
1.96× / 2.53×; en_hard +1.15 / +5.00 at 3.27× / 3.84×; longform +0.30 / +0.89 at 2.22× / 2.83×;
batched against one-at-a-time words 0 / 1–15 %. The extra element-wise work per call (scale,
divide, the sentinel row, rescale) is what the speed-up gives back.

Two traps in openai-whisper: the logits are `x @ token_embedding.weight.T`, not a layer at all,
so an int8 linear over the embedding matrix becomes the decoder's output projection; and the
token embedding itself (used for look-ups only after that) is stored as int8 rows with one scale
per row, which saves a further 3/4 of the largest matrix.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor, nn
from whisper.model import Whisper

from optim.memory import release_freed_memory
from optim.variants.modules import use_variant_decoder
from optim.variants.technique import Technique


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W int8 per output channel and x quantized per row (module doc)."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor] = None):
        super().__init__()
        weight = weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        with warnings.catch_warnings():
            # torch's quantized tensors are deprecated in favour of torchao, whose int8 kernels are
            # two orders of magnitude slower on this CPU (module doc); keep them, quietly.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            zero_points = torch.zeros_like(scales, dtype=torch.long)
            qweight = torch.quantize_per_channel(weight, scales.double(), zero_points, 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        sentinel = torch.zeros(1, self.in_features)
        sentinel[0, :2] = torch.tensor([-1.0, 1.0])
        self.register_buffer("sentinel", sentinel)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features).float()
        scale = torch.linalg.vector_norm(rows, float("inf"), dim=1, keepdim=True).clamp_(min=1e-12)
        pinned = torch.cat([rows / scale, self.sentinel])
        y = torch.ops.quantized.linear_dynamic(pinned, self._packed, True)[:-1].mul_(scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The packed weight is an fbgemm object, invisible to state_dict; expose it (unpacked) so
        # that memory accounting (optim.variants.modules.nbytes) sees the int8 weights.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "qweight"] = torch.ops.quantized.linear_unpack(self._packed)[0]


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
    linears = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for parent, name, child in linears:
        setattr(parent, name, Int8Linear(child.weight, child.bias))
    embedding = decoder.token_embedding.weight.detach()
    decoder.output_projection = Int8Linear(embedding)  # the tied logits projection, as a layer
    decoder.token_embedding = Int8Embedding(embedding)
    del embedding, linears
    release_freed_memory()
    return model


TECHNIQUE = Technique("int8", apply_int8, stage=2, group="precision", devices=("cpu",))
