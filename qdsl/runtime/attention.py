"""The runtime module ``qdsl.passes.fuse_attention`` puts in a graph: float attention as
one ``scaled_dot_product_attention`` over the filled part of the key/value cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
            cache_position: Tensor | None, scale: float, gqa: bool) -> Tensor:
    if cache_position is not None:
        n = int(cache_position[-1]) + 1
        k, v = k[:, :, :n], v[:, :, :n]
        if mask is not None:
            mask = mask[..., :n]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


@torch.library.custom_op("qdsl::cached_attention", mutates_args=())
def cached_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                     cache_position: Tensor, scale: float, gqa: bool) -> Tensor:
    """``_attend`` as one opaque op: a compiled graph (``qdsl.runtime.compiled``) keeps
    static shapes while the op reads only the filled part of the cache."""
    return _attend(q, k, v, mask, cache_position, scale, gqa)


@cached_attention.register_fake
def _(q, k, v, mask, cache_position, scale, gqa):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


class FusedAttention(nn.Module):
    """``softmax(q @ k^T * scale + mask) @ v`` over the first ``cache_position[-1] + 1``
    keys; ``gqa``: k / v have fewer heads than q (SDPA repeats them)."""

    def __init__(self, scale: float, gqa: bool = False):
        super().__init__()
        self.scale, self.gqa = scale, gqa

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                cache_position: Tensor | None = None) -> Tensor:
        if cache_position is not None and torch.compiler.is_compiling():
            return torch.ops.qdsl.cached_attention(q, k, v, mask, cache_position,
                                                   self.scale, self.gqa)
        return _attend(q, k, v, mask, cache_position, self.scale, self.gqa)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, gqa={self.gqa}"
