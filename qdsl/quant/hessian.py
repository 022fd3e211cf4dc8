"""``InputStats``: what GPTQ and AWQ keep of a linear's calibration inputs.

Put on a linear's input during calibration (``passes.round_weights``), it returns
its input unchanged and accumulates, over every token of every batch, ``sum x x^T``
(``[in, in]`` float32), ``sum |x|`` per input channel and the token count. Nothing
else is kept: the memory is ``in^2`` floats per distinct linear input, whatever the
amount of calibration data. ``hessian()`` is GPTQ's ``H = 2 X X^T / n``;
``act_mean()`` is AWQ's ``mean|x|``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class InputStats(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("xtx", torch.empty(0))
        self.register_buffer("abs_sum", torch.empty(0))
        self.count = 0

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            xf = x.detach().reshape(-1, x.shape[-1]).float()
            if self.xtx.numel() == 0:
                d = xf.shape[-1]
                self.xtx, self.abs_sum = torch.zeros(d, d), torch.zeros(d)
            self.xtx = torch.addmm(self.xtx, xf.T, xf)
            self.abs_sum = self.abs_sum + xf.abs().sum(0)
            self.count += xf.shape[0]
        return x

    def calib_state(self) -> dict[str, Tensor]:
        """What a calibration checkpoint saves (``qdsl.passes.calibrate``)."""
        return {**self.state_dict(), "count": torch.tensor(self.count, dtype=torch.int64)}

    def load_calib_state(self, state: dict[str, Tensor]) -> None:
        state = dict(state)
        self.count = int(state.pop("count"))
        for name, t in state.items():   # buffers start empty: take the saved shapes
            if name not in self._buffers:
                raise KeyError(f"InputStats has no buffer {name!r}")
            setattr(self, name, t.clone())

    def _need(self) -> None:
        if self.count == 0:
            raise RuntimeError("InputStats has seen no calibration input")

    def hessian(self) -> Tensor:
        """``2 X X^T / n`` [in, in] float32 over the n tokens seen."""
        self._need()
        return self.xtx * (2.0 / self.count)

    def act_mean(self) -> Tensor:
        """``mean|x|`` per input channel [in] float32."""
        self._need()
        return self.abs_sum / self.count
