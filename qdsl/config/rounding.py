"""Rounding options of a weight spec: how a weight's codes are chosen on the grid
its spec defines (docs/algorithms-weights.md). ``None`` in a spec is round to
nearest. GPTQ and AWQ choose other codes on the same grid from the Hessian of each
linear's calibration inputs; frozen dataclasses, validated on construction, JSON
through ``qdsl.config.spec`` like the granularities and observers. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from .base import WEIGHT, SpecError

@dataclass(frozen=True)
class GPTQ:
    """Frantar et al. 2022: columns rounded one at a time, the error of each spread
    over the columns not yet rounded through the inverse Hessian H^-1 of
    H = 2 X X^T. ``damp``: fraction of mean(diag H) added to the diagonal;
    ``block``: columns per lazy batch update; ``act_order``: columns in order of
    decreasing diag(H) (groups stay contiguous input columns, their scales taken
    from the original weight: GPTQ's static groups)."""

    damp: float = 0.01
    block: int = 128
    act_order: bool = False
    name = "gptq"
    kinds = (WEIGHT,)

    def __post_init__(self) -> None:
        if not isinstance(self.damp, (int, float)) or isinstance(self.damp, bool) \
                or not 0.0 < float(self.damp) <= 1.0:
            raise SpecError(f"gptq damp must be in (0, 1], got {self.damp!r}")
        if not isinstance(self.block, int) or isinstance(self.block, bool) or self.block < 1:
            raise SpecError(f"gptq block must be an integer >= 1, got {self.block!r}")
        if not isinstance(self.act_order, bool):
            raise SpecError(f"gptq act_order must be a boolean, got {self.act_order!r}")


@dataclass(frozen=True)
class AWQ:
    """Lin et al. 2023: per-input-channel scales s = mean|x|^a, a on a grid of
    ``grid`` points in [0, 1), the a minimising the linear's output error on the
    calibration inputs (a = 0, s = 1, is plain rounding); the weight is quantized as
    W diag(s) and the input multiplied by 1/s. ``clip``: then search a clipping ratio
    per (row, group) on the same output error."""

    grid: int = 20
    clip: bool = False
    name = "awq"
    kinds = (WEIGHT,)

    def __post_init__(self) -> None:
        if not isinstance(self.grid, int) or isinstance(self.grid, bool) \
                or not 1 <= self.grid <= 1000:
            raise SpecError(f"awq grid must be an integer in 1..1000, got {self.grid!r}")
        if not isinstance(self.clip, bool):
            raise SpecError(f"awq clip must be a boolean, got {self.clip!r}")


@dataclass(frozen=True)
class RTN:
    """Round to nearest, said explicitly: a later rule's way to take GPTQ / AWQ back
    (``embed -> rtn`` after ``* -> w4 gptq``). A resolved spec holds None instead."""

    name = "rtn"
    kinds = (WEIGHT,)


Rounding = Union[GPTQ, AWQ, RTN]
ROUNDINGS: dict[str, type] = {c.name: c for c in (GPTQ, AWQ, RTN)}
