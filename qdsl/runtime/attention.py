"""The runtime module ``qdsl.passes.fuse_attention`` puts in a graph: float attention as
one ``scaled_dot_product_attention`` over the filled part of the key/value cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FusedAttention(nn.Module):
    """``softmax(q @ k^T * scale + mask) @ v`` over the first ``cache_position[-1] + 1``
    keys; ``gqa``: k / v have fewer heads than q (SDPA repeats them)."""

    def __init__(self, scale: float, gqa: bool = False):
        super().__init__()
        self.scale, self.gqa = scale, gqa

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                cache_position: Tensor | None = None) -> Tensor:
        # compiled (static shapes): attend over the whole cache, the mask hides the rest
        if cache_position is not None and not (mask is not None
                                               and torch.compiler.is_compiling()):
            n = int(cache_position[-1]) + 1
            k, v = k[:, :, :n], v[:, :, :n]
            if mask is not None:
                mask = mask[..., :n]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                              enable_gqa=self.gqa)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, gqa={self.gqa}"
