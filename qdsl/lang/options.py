"""The spec words of the language, as a table: which ``TensorPatch`` field each
sets, which tensor kinds it may apply to, and which arguments it takes.

The tensor kinds come from the spec classes themselves (``PerChannel.kinds``),
so the language and the quantizers agree on what applies to what.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from ..config.rounding import AWQ, GPTQ, RTN
from ..config.spec import (ACTIVATION, MSE, WEIGHT, CurrentMinMax, GroupWise, MinMax, Percentile,
                           PerChannel, PerGroup, PerTensor, PerToken, RunningMinMax)

BOTH = (WEIGHT, ACTIVATION)

# What a field is called in a conflict message ("both set the weights' observer").
SLOT_NAMES = {"precision": "precision", "symmetric": "symmetry", "granularity": "granularity",
              "observer": "observer", "dynamic": "static/dynamic mode",
              "rounding": "rounding (gptq / awq)"}


def _positive_int(name: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if isinstance(v, int) and v >= 1:
            return None
        return f"{name} must be an integer >= 1, got {_fmt(v)}"
    return check


def _momentum(v: Any) -> str | None:
    if isinstance(v, (int, float)) and 0.0 <= v < 1.0:
        return None
    return f"momentum must be in [0, 1), got {_fmt(v)}"


def _percent(v: Any) -> str | None:
    if isinstance(v, (int, float)) and 0.0 < v <= 100.0:
        return None
    return f"percentile must be in (0, 100], got {_fmt(v)}"


def _damp(v: Any) -> str | None:
    if isinstance(v, (int, float)) and 0.0 < v <= 1.0:
        return None
    return f"damp must be in (0, 1], got {_fmt(v)}"


def _grid(v: Any) -> str | None:
    if isinstance(v, int) and 1 <= v <= 1000:
        return None
    return f"grid must be an integer in 1..1000, got {_fmt(v)}"


def _fmt(v: Any) -> str:
    if isinstance(v, float) and math.isfinite(v) and v == int(v) and abs(v) < 1e16:
        return repr(v)
    return str(v)


@dataclass(frozen=True)
class ArgDef:
    """One argument: ``flag`` arguments are bare words (``permute``); others take a number."""

    name: str
    check: Callable[[Any], str | None] | None = None  # None = flag
    required: bool = False

    @property
    def is_flag(self) -> bool:
        return self.check is None


@dataclass(frozen=True)
class OptionDef:
    word: str
    slot: str  # TensorPatch field it sets ('precision': {bits: N} or {float_dtype: D})
    kinds: tuple[str, ...]
    build: Callable[..., Any]  # keyword arguments (by ArgDef.name) -> field value
    args: tuple[ArgDef, ...] = ()
    positional: int = 0  # how many leading args may be written without a name
    example: str = ""

    @property
    def is_observer(self) -> bool:
        return self.slot == "observer"


def _defs() -> dict[str, OptionDef]:
    pos_int = _positive_int
    defs = [
        OptionDef("sym", "symmetric", BOTH, lambda: True),
        OptionDef("asym", "symmetric", BOTH, lambda: False),
        OptionDef("per_tensor", "granularity", PerTensor.kinds, PerTensor),
        OptionDef("per_channel", "granularity", PerChannel.kinds, PerChannel),
        OptionDef("per_token", "granularity", PerToken.kinds, PerToken),
        OptionDef("per_group", "granularity", PerGroup.kinds,
                  lambda K, permute=False: PerGroup(K, permute),
                  (ArgDef("K", pos_int("K"), True), ArgDef("permute")), 1,
                  "per_group(K=8, permute)"),
        OptionDef("group", "granularity", GroupWise.kinds, lambda size: GroupWise(size),
                  (ArgDef("size", pos_int("group size"), True),), 1, "group(size=128)"),
        OptionDef("minmax", "observer", BOTH, MinMax),
        OptionDef("current_minmax", "observer", BOTH, CurrentMinMax),
        OptionDef("running_minmax", "observer", BOTH, lambda momentum=0.9: RunningMinMax(momentum),
                  (ArgDef("momentum", _momentum),), 1, "running_minmax(momentum=0.9)"),
        OptionDef("mse", "observer", BOTH, lambda candidates=100: MSE(candidates),
                  (ArgDef("candidates", pos_int("candidates")),), 1, "mse(candidates=100)"),
        OptionDef("percentile", "observer", BOTH, lambda p: Percentile(p),
                  (ArgDef("p", _percent, True),), 1, "percentile(99.9)"),
        OptionDef("gptq", "rounding", GPTQ.kinds,
                  lambda damp=0.01, block=128, act_order=False: GPTQ(damp, block, act_order),
                  (ArgDef("damp", _damp), ArgDef("block", pos_int("block")),
                   ArgDef("act_order")), 0, "gptq(damp=0.01, block=128, act_order)"),
        OptionDef("awq", "rounding", AWQ.kinds, lambda grid=20, clip=False: AWQ(grid, clip),
                  (ArgDef("grid", _grid), ArgDef("clip")), 0, "awq(grid=20, clip)"),
        OptionDef("rtn", "rounding", RTN.kinds, RTN),
        OptionDef("static", "dynamic", (ACTIVATION,), lambda: False),
        OptionDef("dynamic", "dynamic", (ACTIVATION,), lambda: True),
        OptionDef("fp16", "precision", BOTH, lambda: {"float_dtype": "fp16"}),
        OptionDef("bf16", "precision", BOTH, lambda: {"float_dtype": "bf16"}),
        OptionDef("fp32", "precision", BOTH, lambda: {"float_dtype": "fp32"}),
    ]
    return {d.word: d for d in defs}


OPTIONS: dict[str, OptionDef] = _defs()


def kind_name(kind: str) -> str:
    return "weights" if kind == WEIGHT else "activations"


def kinds_phrase(kinds: tuple[str, ...]) -> str:
    return "weights and activations" if len(kinds) == 2 else f"{kind_name(kinds[0])} only"
