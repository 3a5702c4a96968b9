"""`flash`: fused attention and a static key/value cache.

* Attention runs through PyTorch's `scaled_dot_product_attention`, which dispatches to the
  FlashAttention kernel on CUDA and to the fused (flash-style, tiled) CPU kernel here: no
  (tokens × tokens) weight matrix is materialised.
* Decoding uses a `StaticKVCache`: self-attention keys/values are written into buffers
  preallocated for the whole text context (openai-whisper concatenates, copying the cache at
  every token), and cross-attention keys/values are computed once per 30-s window.

Both are exact rewrites of the same math (logits equal up to float rounding). Word timestamps
still work: openai-whisper's alignment pass turns SDPA off to read the attention weights, and
this attention then falls back to the explicit path.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from whisper.model import MultiHeadAttention, Whisper

from optim.variants.modules import StaticKVCache, set_attention, use_variant_decoder
from optim.variants.technique import Technique


class FlashAttention(MultiHeadAttention):
    def forward(self, x: Tensor, xa: Optional[Tensor] = None, mask: Optional[Tensor] = None, kv_cache: Optional[dict] = None):
        if not isinstance(kv_cache, StaticKVCache):
            return super().forward(x, xa, mask, kv_cache)
        q = self.query(x)
        if xa is not None:
            k, v = kv_cache.cross_attention(self, xa)
            mask = None
        else:
            k, v = kv_cache.self_attention(self, x)
            if k.shape[1] > x.shape[1] and x.shape[1] > 1:
                # several new tokens after a cached prefix: the causal mask must be offset
                mask = _offset_causal_mask(x.shape[1], k.shape[1], x.device)
                return self.out(_sdpa(self, q, k, v, mask)), None
            if x.shape[1] == 1:
                mask = None  # one new token attends to everything cached so far
        wv, qk = self.qkv_attention(q, k, v, mask)
        return self.out(wv), qk


def _offset_causal_mask(n_new: int, n_total: int, device: torch.device) -> Tensor:
    positions = torch.arange(n_total - n_new, n_total, device=device)[:, None]
    return torch.arange(n_total, device=device)[None, :] <= positions


def _sdpa(attn: MultiHeadAttention, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    heads = lambda t: t.view(*t.shape[:2], attn.n_head, -1).transpose(1, 2)  # noqa: E731
    out = torch.nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
    return out.transpose(1, 2).flatten(start_dim=2)


class FlashWhisper(Whisper):
    """Hands openai-whisper's decoding loop a static cache instead of its concatenating hooks."""

    def install_kv_cache_hooks(self, cache: Optional[dict] = None):
        return StaticKVCache(self.dims.n_text_ctx), []


def apply_flash(model: Whisper) -> Whisper:
    set_attention(model, FlashAttention)
    use_variant_decoder(model)
    model.__class__ = FlashWhisper
    return model


TECHNIQUE = Technique("flash", apply_flash, stage=1, fused_attention=True)
