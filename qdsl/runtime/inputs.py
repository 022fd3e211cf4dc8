"""``InputScale``: a linear's input multiplied by a per-channel vector before the
linear reads it (AWQ: the weight is quantized as ``W diag(s)`` and the input is
``x * (1/s)``; ``passes.lower_fake`` inserts it, on that linear's input only)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class InputScale(nn.Module):
    """``x * inv_scale`` (float32 ``[in]``, broadcast over the last dimension)."""

    def __init__(self, inv_scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("inv_scale", inv_scale.detach().float().contiguous())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.inv_scale.to(x.dtype)

    def to_json(self) -> dict:
        return {"type": type(self).__name__, "in_features": self.inv_scale.shape[0]}

    @classmethod
    def from_json(cls, config: dict) -> InputScale:
        """The empty module (meta device) of a ``to_json()``."""
        return cls(torch.empty(int(config["in_features"]), device="meta"))
