"""Calibration statistics for transforms: per-channel absolute maxima.

``ChannelAbsMax`` sits on a node's output during a statistics calibration run
(``passes.transform.collect_stats``) and keeps max |x_j| over every token of every
batch for each channel j of the last dimension, what SmoothQuant's migration
scales need. It returns its input unchanged (the graph still computes the float model).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ChannelAbsMax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("absmax", torch.empty(0))

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            m = x.detach().abs().float().reshape(-1, x.shape[-1]).amax(0)
            self.absmax = m if not self.absmax.numel() else torch.maximum(self.absmax, m)
        return x


def smooth_scales(x_absmax: Tensor, w_absmax: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's migration scales s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)
    (Xiao et al. 2023, eq. 4), clamped to [1e-5, 1e5]; s_j = 1 where channel j never
    saw a non-zero value or has no weight (nothing to migrate)."""
    x, w = x_absmax.float(), w_absmax.float()
    s = x.clamp(min=1e-5).pow(alpha) / w.clamp(min=1e-5).pow(1.0 - alpha)
    s = torch.where((x > 0) & (w > 0), s, torch.ones_like(s))
    return s.clamp(1e-5, 1e5)
