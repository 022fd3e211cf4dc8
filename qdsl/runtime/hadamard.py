"""``OnlineHadamard``: x -> x @ H_n at run time (QuaRot's online rotation before the
down-projection, whose weight holds the matching H_n: docs/algorithms.md).

H_n is the orthonormal Hadamard matrix of ``qdsl.quant.hadamard`` (Sylvester x Paley),
applied as a few small dense products (``apply_hadamard``): the 2^k factor split into
Sylvester factors of order <= 128, then the m x m Paley factor. No stored tensors: the
factors are rebuilt from n and cached per process.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..quant.hadamard import apply_hadamard, hadamard_factors


class OnlineHadamard(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        if hadamard_factors(n) is None:
            raise ValueError(f"no Hadamard matrix of order {n}")
        self.n = n

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return apply_hadamard(x, self.n)
        return apply_hadamard(x.float(), self.n).to(x.dtype)

    def to_json(self) -> dict:
        return {"type": type(self).__name__, "n": self.n}

    @classmethod
    def from_json(cls, config: dict) -> OnlineHadamard:
        return cls(int(config["n"]))

    def extra_repr(self) -> str:
        return f"n={self.n}"
