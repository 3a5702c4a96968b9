"""The two places where variants change openai-whisper's modules, shared so that variants compose.

* `VariantTextDecoder` is openai-whisper's `TextDecoder` with two seams: a static key/value
  cache (the `flash` variant) and a replaceable output projection (the `int8` variant; in
  openai-whisper the logits are a matmul with the token embedding, not a layer).
* `EagerAttention` computes attention the way the paper's model does (explicit softmax), so
  that the `fp32` reference and the variants that do not change attention share one baseline.

Variants switch a module's class in place (`module.__class__ = ...`): the weights stay where
they are, and code that checks `isinstance(..., MultiHeadAttention)` keeps working.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from whisper.model import MultiHeadAttention, TextDecoder, Whisper


class EagerAttention(MultiHeadAttention):
    """Attention as softmax(q kᵀ / √d) v with explicit tensors: the reference computation."""

    def qkv_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None):
        n_batch, n_ctx, n_state = q.shape
        scale = (n_state // self.n_head) ** -0.25
        q = q.view(*q.shape[:2], self.n_head, -1).permute(0, 2, 1, 3)
        k = k.view(*k.shape[:2], self.n_head, -1).permute(0, 2, 1, 3)
        v = v.view(*v.shape[:2], self.n_head, -1).permute(0, 2, 1, 3)
        qk = (q * scale) @ (k * scale).transpose(-1, -2)
        if mask is not None:
            qk = qk + mask[:n_ctx, :n_ctx]
        qk = qk.float()
        w = F.softmax(qk, dim=-1).to(q.dtype)
        return (w @ v).permute(0, 2, 1, 3).flatten(start_dim=2), qk.detach()


class StaticKVCache(dict):
    """Key/value cache preallocated for the whole text context.

    Keys are the attention's key/value projection modules (as in openai-whisper's hook-based
    cache, so its beam-search reordering `cache[module] = cache[module][indices]` still works);
    values are (batch, n_text_ctx, width) buffers written in place at `length`, instead of a
    `torch.cat` that copies the whole cache at every token. Cross-attention keys/values are
    computed once per audio window and kept.
    """

    def __init__(self, n_ctx: int):
        super().__init__()
        self.n_ctx = n_ctx
        self.length = 0  # tokens already cached; advanced by the decoder after each step

    def __bool__(self) -> bool:  # openai-whisper re-installs a cache it finds falsy (empty)
        return True

    def self_attention(self, attn: MultiHeadAttention, x: Tensor) -> tuple[Tensor, Tensor]:
        k, v = attn.key(x), attn.value(x)
        if attn.key not in self:
            shape = (x.shape[0], self.n_ctx, k.shape[-1])
            self[attn.key] = torch.empty(shape, dtype=k.dtype, device=k.device)
            self[attn.value] = torch.empty(shape, dtype=v.dtype, device=v.device)
        end = self.length + x.shape[1]
        self[attn.key][:, self.length : end] = k
        self[attn.value][:, self.length : end] = v
        return self[attn.key][:, :end], self[attn.value][:, :end]

    def cross_attention(self, attn: MultiHeadAttention, xa: Tensor) -> tuple[Tensor, Tensor]:
        if attn.key not in self:
            self[attn.key], self[attn.value] = attn.key(xa), attn.value(xa)
        return self[attn.key], self[attn.value]


class VariantTextDecoder(TextDecoder):
    """openai-whisper's TextDecoder with a static-cache path and a pluggable output projection
    (a submodule named `output_projection`; without one, the tied token-embedding matmul)."""

    def forward(self, x: Tensor, xa: Tensor, kv_cache: Optional[dict] = None) -> Tensor:
        if isinstance(kv_cache, StaticKVCache):
            offset = kv_cache.length
        else:
            offset = next(iter(kv_cache.values())).shape[1] if kv_cache else 0
        x = self.token_embedding(x) + self.positional_embedding[offset : offset + x.shape[-1]]
        x = x.to(xa.dtype)
        for block in self.blocks:
            x = block(x, xa, mask=self.mask, kv_cache=kv_cache)
        if isinstance(kv_cache, StaticKVCache):
            kv_cache.length += x.shape[1]
        return self.project(self.ln(x))

    def project(self, x: Tensor) -> Tensor:
        if "output_projection" in self._modules:
            return self._modules["output_projection"](x).float()
        return (x @ torch.transpose(self.token_embedding.weight.to(x.dtype), 0, 1)).float()


def use_variant_decoder(model: Whisper) -> VariantTextDecoder:
    if not isinstance(model.decoder, VariantTextDecoder):
        model.decoder.__class__ = VariantTextDecoder
    return model.decoder


def set_attention(model: Whisper, attention: type[MultiHeadAttention]) -> None:
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.__class__ = attention


def nbytes(model: nn.Module, shared_with: Optional[nn.Module] = None) -> int:
    """Bytes held by a model's weights and buffers, quantized (packed) weights included;
    with `shared_with`, leaving out tensors that model holds too (the same storage)."""
    exclude = set() if shared_with is None else {t.data_ptr() for t in _tensors(shared_with)}
    seen = set()
    total = 0
    for t in _tensors(model):
        if t.data_ptr() not in exclude and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _tensors(model: nn.Module) -> list[Tensor]:
    found = []
    for value in model.state_dict(keep_vars=True).values():
        found += [t for t in (value if isinstance(value, tuple) else (value,)) if isinstance(t, Tensor)]
    found += [b for b in model.buffers() if b is not None]
    return [t for t in found if t.layout == torch.strided]  # the sparse alignment-head mask is tiny
