"""``InputScale``: a linear's input multiplied by a per-channel vector before the
linear reads it (AWQ: the weight is quantized as ``W diag(s)`` and the input is
``x * (1/s)``; ``passes.lower_fake`` inserts it, on that linear's input only)."""

from __future__ import annotations

from torch import Tensor, nn


class InputScale(nn.Module):
    """``x * inv_scale`` (float32 ``[in]``, broadcast over the last dimension)."""

    def __init__(self, inv_scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("inv_scale", inv_scale.detach().float().contiguous())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.inv_scale.to(x.dtype)
