"""`int8`: every linear layer in INT8, the output projection included, with one activation scale
per row, so a window's words do not depend on what shares its batch.

Weights are int8 with one scale per output channel; the matmul runs in int8 with int32
accumulation in PyTorch's fbgemm kernels (x86). Measured on this 2-core AVX-512 CPU for base's
(512 → 51865) logits projection at batch 1: float32 9.7 ms, int8 0.36 ms; torchao 0.18's int8
configs took 34–40 ms and `torch._int_mm` 3.1 ms, so fbgemm's dynamic linear is the kernel used.

**Activations, per row.** fbgemm's dynamic linear quantizes its whole input with one scale
from the input's min and max. Over a batch that couples the rows: a loud window coarsens a quiet
one's rounding, so a window's words changed with its batch-mates, and the batched WER suffered.
Here each row is first divided by its own max |x|, so it lies in [-1, 1], and quantized with
the fixed range [-1, 1] (`linear_with_input_q_dq_qweight_dq_output_fp32`: fbgemm's int8 GEMM
with the activation's scale and zero point given, float32 out). Every row is quantized with the
same step relative to its own peak, the int32 products are exact, and the output row is
multiplied back by the row's scale, with the bias added in the same pass. A row's result is
bitwise the same in any batch. (The first version appended a sentinel row [-1, 1, 0, ...] to pin
the dynamic linear's range; the fixed-range kernel gives bitwise the same output with one copy
of the input fewer.)

**8-bit activations where the CPU allows.** On a CPU with AVX-512 VNNI, fbgemm multiplies u8 × s8
straight into int32, and activations use all 8 bits (step 2/255 of the row's peak). Without VNNI
it sums pairs of products in int16 (vpmaddubsw), where 2 × 255 × 127 overflows, so activations
use 7 bits there (`REDUCE_RANGE`, as torch.ao does by default). The words can therefore differ
between the two kinds of CPU; on either, batched equals unbatched.

**The decoder's activations in two passes.** 8 bits of a row's peak are coarse where a channel
stands out: the inputs of the MLP's output layer and of the cross-attention K/V peak at 12-28×
their RMS (base, en_hard), so an ordinary value gets a handful of levels. In the decoder that
rounding decides words: on hard speech, delaying the audio by 1-3 samples moved one-pass int8's
WER between 31.2 and 35.8 % while fp32's stayed within 31.9-32.3 %. So every decoder layer (the
output projection and the cross-attention K/V included) runs `TwoPassInt8Linear`: the first
pass's rounding error, at most half a step, is stretched to [-1, 1], quantized again and
multiplied by the same int8 weights, which leaves activations good to about 16 bits (an 8-bit
step of an 8-bit step) and only the weights' own rounding. The second GEMM is cheap there: the
decoder multiplies a few rows per step, and its cost is per-call overhead more than arithmetic.
The encoder, where 1500 rows per window make the GEMM the cost, stays at one pass: two passes
there would be slower than float32. Still row by row, so still bitwise batch-invariant.

Measured in one run (base, `python -m benchmarks.int8`, benchmarks/int8.md): see the table
there for WER and speed against fp32 of this int8, of the one-pass one, of the 7-bit per-row
one and of the old per-tensor one; `--shifts` (benchmarks/int8_shifts.md) for how far a
1-sample delay moves each.

Two traps in openai-whisper: the logits are `x @ token_embedding.weight.T`, not a layer at all,
so an int8 linear over the embedding matrix becomes the decoder's output projection; and the
token embedding itself (used for look-ups only after that) is stored as int8 rows with one scale
per row, which saves a further 3/4 of the largest matrix. Both uses share one quantization of
that matrix (`quantize_rows`), and its float copy is freed before fbgemm packs the projection:
building base's int8 from the stored float16 weights peaked at 629 MB of RSS before and 508 MB
after, in one session (`python -m benchmarks.memory` measures the build in a fresh process).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn
from whisper.model import Whisper

from optim.memory import release_freed_memory
from optim.variants.modules import use_variant_decoder
from optim.variants.technique import Technique


def _has_vnni() -> bool:
    """AVX-512 VNNI: fbgemm then multiplies u8 × s8 straight into int32 (vpdpbusd)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return "avx512_vnni" in flags.split()


# 7-bit activations only where 8-bit ones could saturate: without VNNI fbgemm sums pairs of
# u8 × s8 products in int16 (vpmaddubsw), and 2 × 255 × 127 overflows it (module doc).
REDUCE_RANGE = not _has_vnni()
# The quantization of a row divided by its peak: [-1, 1] onto 0..255 (or 0..127), as fbgemm's own
# choice of parameters for that range would be.
ROW_QPARAMS = (2 / 127, 64) if REDUCE_RANGE else (2 / 255, 128)
_fixed_range_linear = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32


# Quantize this many rows at a time: the float32 copy a row block needs while it is quantized
# stays small (4096 × 512 floats: 8 MB) even for the 51865-row embedding matrix (106 MB whole).
CHUNK_ROWS = 4096


@contextlib.contextmanager
def _quietly():
    """torch's quantized tensors are deprecated in favour of torchao, whose int8 kernels are two
    orders of magnitude slower on this CPU (module doc): keep them, without the warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


# int8 values and one float32 scale per row (output channel): a weight matrix as quantized once.
Rows = tuple[Tensor, Tensor]


def quantize_rows(weight: Tensor) -> Rows:
    """A float matrix as int8 rows with one scale each (max |w| / 127), block by block so that
    the float32 copy a block needs stays small: the same values as one `quantize_per_channel`
    over the whole matrix, which is row-independent."""
    weight = weight.detach()  # float32, or float16 as stored
    scales = torch.cat([weight[i : i + CHUNK_ROWS].float().abs().amax(dim=1) for i in range(0, len(weight), CHUNK_ROWS)])
    scales = scales.clamp_(min=1e-8).div_(127)
    values = torch.empty(weight.shape, dtype=torch.int8)
    zero_points = torch.zeros(len(scales), dtype=torch.long)
    with _quietly():
        for i in range(0, len(weight), CHUNK_ROWS):
            block = slice(i, i + CHUNK_ROWS)
            values[block] = torch.quantize_per_channel(weight[block].float(), scales[block].double(), zero_points[block], 0, torch.qint8).int_repr()
    return values, scales


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W int8 per output channel and x quantized per row (module doc)."""

    qparams: tuple[float, int] = ROW_QPARAMS

    def __init__(self, weight: Tensor | Rows, bias: Optional[Tensor] = None):
        super().__init__()
        values, scales = quantize_rows(weight) if isinstance(weight, Tensor) else weight
        zero_points = torch.zeros(len(scales), dtype=torch.long)
        with _quietly():
            qweight = torch._make_per_channel_quantized_tensor(values, scales.double(), zero_points, 0)
            self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.in_features, self.out_features = values.shape[1], values.shape[0]
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features).float()
        # abs().amax(), not linalg.vector_norm(inf): the same value, 12× faster on (1500, 2048)
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12)
        y = self._matmul(rows / scale)
        y = y.mul_(scale) if self.bias is None else torch.addcmul(self.bias, y, scale)
        return y.view(*x.shape[:-1], self.out_features)

    def _matmul(self, rows: Tensor) -> Tensor:
        """W·q(rows) for rows in [-1, 1], in float32."""
        return _fixed_range_linear(rows, *self.qparams, self._packed)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The packed weight is an fbgemm object, invisible to state_dict; expose it (unpacked) so
        # that memory accounting (optim.variants.modules.nbytes) sees the int8 weights.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "qweight"] = torch.ops.quantized.linear_unpack(self._packed)[0]


class TwoPassInt8Linear(Int8Linear):
    """Int8Linear with activations good to about 16 bits: the first pass's rounding error, itself
    quantized over [-1, 1], goes through the same int8 weights a second time (module doc)."""

    def _matmul(self, rows: Tensor) -> Tensor:
        step, zero = self.qparams
        # What the first pass multiplied: fbgemm rounds half up (not to even) on the uint8 grid.
        rounded = (torch.floor(rows * (1 / step) + (zero + 0.5)).clamp_(0, 2 * zero - 1) - zero) * step
        error = (rows - rounded).mul_(2 / step)  # within ±step/2, stretched to [-1, 1]
        return super()._matmul(rows).add_(super()._matmul(error), alpha=step / 2)


class Int8Embedding(nn.Module):
    """Embedding rows stored as int8 with a per-row scale; a look-up dequantizes only its rows."""

    def __init__(self, weight: Tensor | Rows):
        super().__init__()
        values, scales = quantize_rows(weight) if isinstance(weight, Tensor) else weight
        self.register_buffer("qweight", values)
        self.register_buffer("scale", scales[:, None])

    def forward(self, tokens: Tensor) -> Tensor:
        return self.qweight[tokens].float() * self.scale[tokens]


def apply_int8(model: Whisper) -> Whisper:
    if model.device.type != "cpu":
        raise ValueError("int8 uses PyTorch's CPU kernels (fbgemm); on CUDA use fp16")
    decoder = use_variant_decoder(model)
    # The largest matrix (base: 51865 × 512), quantized once for both of its uses: the tied
    # logits projection, as a layer, and the look-ups. Its float copy is freed before fbgemm
    # packs the projection, which keeps the build's peak down (module doc).
    rows = quantize_rows(decoder.token_embedding.weight)
    decoder.token_embedding = Int8Embedding(rows)
    release_freed_memory()
    decoder.output_projection = Int8Linear(rows)
    del rows
    # (parent, name) only, so that each float layer is freed as soon as it is replaced: building
    # from the stored float16 weights, the model never holds much more than the float16 copy.
    for parent, name in [(p, n) for p in model.modules() for n, c in p.named_children() if isinstance(c, nn.Linear)]:
        linear = getattr(parent, name)
        setattr(parent, name, Int8Linear(linear.weight, linear.bias))
        del linear
    for module in decoder.modules():  # the decoder's activations in two passes (module doc)
        if type(module) is Int8Linear:
            module.__class__ = TwoPassInt8Linear
    model.float()  # what stays floating (convolutions, norms, positions) from the stored float16; a no-op on float32
    release_freed_memory()
    return model


TECHNIQUE = Technique("int8", apply_int8, stage=2, group="precision", devices=("cpu",), own_weights=True)
