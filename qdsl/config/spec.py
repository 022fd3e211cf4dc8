"""Quantization specs: the one representation shared by the language, the
planner, observers, fake-quant and real lowering.

No torch here. Everything is a frozen dataclass, validated on construction
and convertible to and from JSON-ready dicts.

Two levels:

* ``TensorPatch``: what ONE recipe rule says about one tensor kind (weights or
  activations). Every field may be ``None`` = "this rule does not set it".
  The cascade applies patches in rule order; later patches override the
  fields they set.
* ``TensorSpec``: the fully resolved spec of one tensor after the cascade and
  the defaults (``resolve``). ``bits is None`` means the tensor stays float.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Union

from .base import ACTIVATION, WEIGHT, Kind, SpecError  # noqa: F401 (re-exported)
from .rounding import AWQ, GPTQ, ROUNDINGS, RTN, Rounding

MIN_BITS, MAX_BITS = 1, 16
FLOAT_BITS = 32  # `w32` / `a32`: leave the tensor in float (the seeds' "A32")
FLOAT_DTYPES = ("fp32", "fp16", "bf16")


def check_bits(bits: Any, *, float_ok: bool = False) -> int:
    """The one check of a bit width: an int in ``MIN_BITS..MAX_BITS`` (``float_ok``: or
    ``FLOAT_BITS``, a rule's "keep float"); SpecError otherwise. The spec constructors
    call it, and the quantizer maths' ``qrange`` (the language's checker turns the spec's
    error into a located diagnostic)."""
    if not isinstance(bits, int) or isinstance(bits, bool) \
            or not (MIN_BITS <= bits <= MAX_BITS or (float_ok and bits == FLOAT_BITS)):
        also = f" (or {FLOAT_BITS} for float)" if float_ok else " (None for float)"
        raise SpecError(f"bits must be {MIN_BITS}..{MAX_BITS}{also}, got {bits!r}")
    return bits


# --------------------------------------------------------------------------
# Granularity: how many (scale, zero point) pairs a tensor gets.


@dataclass(frozen=True)
class PerTensor:
    """One scale and zero point for the whole tensor."""

    name = "per_tensor"
    kinds = (WEIGHT, ACTIVATION)


@dataclass(frozen=True)
class PerChannel:
    """Weights: one scale per output row (dim 0 of a [out, in] weight)."""

    name = "per_channel"
    kinds = (WEIGHT,)


@dataclass(frozen=True)
class PerToken:
    """Activations: one scale per token (every position of [B, T, d]); always dynamic."""

    name = "per_token"
    kinds = (ACTIVATION,)


@dataclass(frozen=True)
class PerGroup:
    """Activations, per-embedding-group (Bondarenko et al. 2021, PEG).

    The hidden dimension d is split into ``k`` contiguous groups of d/k
    dimensions, each with its own range; with ``permute`` the dimensions are
    first sorted by their calibrated range so that outlier dimensions share a
    group. k=1 is per-tensor; k=d is one range per hidden dimension.
    """

    k: int
    permute: bool = False
    name = "per_group"
    kinds = (ACTIVATION,)

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise SpecError(f"per_group K must be an integer >= 1, got {self.k!r}")


@dataclass(frozen=True)
class GroupWise:
    """Weights: groups of ``size`` consecutive input columns share a scale (per row)."""

    size: int
    name = "group"
    kinds = (WEIGHT,)

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise SpecError(f"group size must be an integer >= 1, got {self.size!r}")


Granularity = Union[PerTensor, PerChannel, PerToken, PerGroup, GroupWise]
GRANULARITIES: dict[str, type] = {
    c.name: c for c in (PerTensor, PerChannel, PerToken, PerGroup, GroupWise)
}

# --------------------------------------------------------------------------
# Observers / range estimators (Bondarenko et al. 2021, the Storti seed).


@dataclass(frozen=True)
class MinMax:
    """Min-max: the tensor's own range (weights); for activations the range over
    ALL calibration batches (the seeds' "all min-max"), so nothing seen in
    calibration is clipped."""

    name = "minmax"


@dataclass(frozen=True)
class CurrentMinMax:
    """The seeds' "current min-max": the range of the latest calibration batch only
    (Bondarenko et al.'s CurrentMinMaxEstimator; Storti Table 1). Same as MinMax for weights."""

    name = "current_minmax"


@dataclass(frozen=True)
class RunningMinMax:
    """Exponential moving average of per-batch min/max: new = m*old + (1-m)*batch."""

    momentum: float = 0.9
    name = "running_minmax"

    def __post_init__(self) -> None:
        if not isinstance(self.momentum, (int, float)) or isinstance(self.momentum, bool) \
                or not 0.0 <= float(self.momentum) < 1.0:
            raise SpecError(f"running_minmax momentum must be in [0, 1), got {self.momentum!r}")


@dataclass(frozen=True)
class MSE:
    """Grid search over clipping ranges minimising the squared reconstruction error."""

    candidates: int = 100
    name = "mse"

    def __post_init__(self) -> None:
        if not isinstance(self.candidates, int) or isinstance(self.candidates, bool) \
                or self.candidates < 1:
            raise SpecError(f"mse candidates must be an integer >= 1, got {self.candidates!r}")


@dataclass(frozen=True)
class Percentile:
    """Clip the range at the p-th percentile of |x| (symmetric) or of each tail."""

    p: float
    name = "percentile"

    def __post_init__(self) -> None:
        if not isinstance(self.p, (int, float)) or isinstance(self.p, bool) \
                or not 0.0 < float(self.p) <= 100.0:
            raise SpecError(f"percentile must be in (0, 100], got {self.p!r}")


Observer = Union[MinMax, CurrentMinMax, RunningMinMax, MSE, Percentile]
OBSERVERS: dict[str, type] = {c.name: c for c in (MinMax, CurrentMinMax, RunningMinMax, MSE,
                                                   Percentile)}


def _option_to_json(opt: Any) -> dict[str, Any] | None:
    if opt is None:
        return None
    return {"name": opt.name, **asdict(opt)}


def _option_from_json(d: dict[str, Any] | None, table: dict[str, type]) -> Any:
    if d is None:
        return None
    if not isinstance(d, dict) or d.get("name") not in table:
        raise SpecError(f"expected one of {', '.join(table)}, got {str(d)[:60]}")
    d = dict(d)
    cls = table[d.pop("name")]
    try:
        return cls(**d)
    except TypeError as e:  # an unknown or missing parameter
        raise SpecError(f"{cls.name}: {e}") from None


# --------------------------------------------------------------------------
# What one rule says about one tensor kind.


PRECISION = ("bits", "float_dtype")  # one attribute in the language: w8, fp16, float


@dataclass(frozen=True)
class TensorPatch:
    """Fields a rule sets for weights or for activations; None = not set.

    ``bits``: 1..16 quantize to that many bits; 32 = keep float.
    ``float_dtype``: 'fp16' / 'bf16' / 'fp32' float passthrough (implies no
    integer quantization).
    """

    bits: int | None = None
    float_dtype: str | None = None
    symmetric: bool | None = None
    granularity: Granularity | None = None
    observer: Observer | None = None
    dynamic: bool | None = None
    rounding: Rounding | None = None  # gptq / awq (weights); None: not set

    def __post_init__(self) -> None:
        if self.rounding is not None and type(self.rounding) not in ROUNDINGS.values():
            raise SpecError(f"rounding must be one of {', '.join(ROUNDINGS)}, "
                            f"got {self.rounding!r}")
        if self.bits is not None:
            check_bits(self.bits, float_ok=True)
        if self.float_dtype is not None and self.float_dtype not in FLOAT_DTYPES:
            raise SpecError(f"float dtype must be one of {FLOAT_DTYPES}, got {self.float_dtype!r}")

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    def set_fields(self) -> tuple[str, ...]:
        """Names of the attributes this patch sets (what it can override)."""
        return tuple(f.name for f in fields(self) if getattr(self, f.name) is not None)

    def then(self, later: TensorPatch) -> TensorPatch:
        """Cascade: ``later`` overrides every field it sets. ``bits`` and ``float_dtype``
        are one attribute, the precision (the language's one slot): setting either
        replaces both, so ``* -> fp16`` then ``mlp.c_fc -> w8`` gives c_fc 8-bit weights."""
        return replace(self, **{k: getattr(later, k) for k in later.overrides()})

    def overrides(self) -> tuple[str, ...]:
        """The fields this patch replaces when cascaded: the ones it sets, and both
        precision fields where it sets either."""
        out = self.set_fields()
        if set(out) & set(PRECISION):
            out = tuple(dict.fromkeys(out + PRECISION))
        return out

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["granularity"] = _option_to_json(self.granularity)
        d["observer"] = _option_to_json(self.observer)
        if self.rounding is None:  # absent when unset: older recipes hash as before
            del d["rounding"]
        else:
            d["rounding"] = _option_to_json(self.rounding)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorPatch:
        d = dict(d)
        d["granularity"] = _option_from_json(d.get("granularity"), GRANULARITIES)
        d["observer"] = _option_from_json(d.get("observer"), OBSERVERS)
        d["rounding"] = _option_from_json(d.get("rounding"), ROUNDINGS)
        return cls(**d)


# --------------------------------------------------------------------------
# A fully resolved tensor spec.

# Defaults when a rule gives bits but not the rest (documented in docs/language.md):
# weights: symmetric, per output channel, min-max; activations: asymmetric,
# per tensor, static, min-max over all calibration batches.
DEFAULTS: dict[str, dict[str, Any]] = {
    WEIGHT: dict(symmetric=True, granularity=PerChannel(), observer=MinMax(), dynamic=False),
    ACTIVATION: dict(symmetric=False, granularity=PerTensor(), observer=MinMax(), dynamic=False),
}


@dataclass(frozen=True)
class TensorSpec:
    """How one tensor is quantized. ``bits is None`` = float (``float_dtype``)."""

    kind: str
    bits: int | None
    float_dtype: str = "fp32"
    symmetric: bool = True
    granularity: Granularity = field(default_factory=PerTensor)
    observer: Observer = field(default_factory=MinMax)
    dynamic: bool = False
    rounding: Rounding | None = None  # None: round to nearest

    def __post_init__(self) -> None:
        if self.kind not in (WEIGHT, ACTIVATION):
            raise SpecError(f"kind must be {WEIGHT} or {ACTIVATION}, got {self.kind!r}")
        if self.bits is not None:
            check_bits(self.bits)
        if self.float_dtype not in FLOAT_DTYPES:
            raise SpecError(f"float dtype must be one of {FLOAT_DTYPES}, got {self.float_dtype!r}")
        if not isinstance(self.symmetric, bool) or not isinstance(self.dynamic, bool):
            raise SpecError(f"symmetric and dynamic must be booleans, got {self.symmetric!r}, "
                            f"{self.dynamic!r}")
        if type(self.granularity) not in GRANULARITIES.values() \
                or self.kind not in self.granularity.kinds:
            raise SpecError(f"granularity {self.granularity!r} does not apply to {self.kind}s")
        if type(self.observer) not in OBSERVERS.values():
            raise SpecError(f"observer must be one of {', '.join(OBSERVERS)}, "
                            f"got {self.observer!r}")
        r, b = self.rounding, self.bits
        if r is not None:
            if type(r) not in ROUNDINGS.values() or isinstance(r, RTN):
                raise SpecError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {r!r}")
            if self.kind != WEIGHT or b is None:
                raise SpecError(f"{r.name} rounds quantized weights only, not "
                                f"{'float ' if b is None else ''}{self.kind}s")
            if b == 1 and self.symmetric:
                raise SpecError(f"{r.name} needs an affine grid: 1-bit symmetric weights are "
                                "sign codes (write asym, or 2+ bits)")

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "bits": self.bits, "float_dtype": self.float_dtype,
                "symmetric": self.symmetric,
                "granularity": _option_to_json(self.granularity),
                "observer": _option_to_json(self.observer), "dynamic": self.dynamic,
                **({"rounding": _option_to_json(self.rounding)} if self.rounding else {})}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorSpec:
        if not isinstance(d, dict):
            raise SpecError(f"a tensor spec must be an object, got {str(d)[:60]}")
        d = dict(d)
        d["granularity"] = _option_from_json(d.get("granularity"), GRANULARITIES)
        d["observer"] = _option_from_json(d.get("observer"), OBSERVERS)
        d["rounding"] = _option_from_json(d.get("rounding"), ROUNDINGS)
        try:
            return cls(**d)
        except TypeError as e:  # an unknown or missing key
            raise SpecError(f"tensor spec: {e}") from None

    def describe(self) -> str:
        """Short text in recipe syntax, e.g. 'w8 sym per_channel mse'."""
        prefix = "w" if self.kind == WEIGHT else "a"
        if not self.quantized:
            return "float" if self.float_dtype == "fp32" else self.float_dtype
        parts = [f"{prefix}{self.bits}", "sym" if self.symmetric else "asym",
                 format_option(self.granularity), format_option(self.observer)]
        if self.kind == ACTIVATION and not isinstance(self.granularity, PerToken):
            parts.append("dynamic" if self.dynamic else "static")
        if self.rounding is not None:
            parts.append(format_option(self.rounding))
        return " ".join(parts)


def resolve(kind: str, patch: TensorPatch) -> TensorSpec:
    """Apply defaults to the cascaded patch of one tensor.

    >>> resolve(ACTIVATION, TensorPatch(bits=8)).describe()
    'a8 asym per_tensor minmax static'
    """
    if patch.bits is None or patch.bits == FLOAT_BITS or patch.float_dtype is not None:
        return TensorSpec(kind=kind, bits=None, float_dtype=patch.float_dtype or "fp32")
    d = dict(DEFAULTS[kind])
    for name in ("symmetric", "granularity", "observer", "dynamic", "rounding"):
        if getattr(patch, name) is not None:
            d[name] = getattr(patch, name)
    if isinstance(d["granularity"], PerToken):
        d["dynamic"] = True
    if isinstance(d.get("rounding"), RTN):
        d["rounding"] = None
    return TensorSpec(kind=kind, bits=patch.bits, **d)


def format_option(opt: Any) -> str:
    """Recipe syntax of a granularity or observer: 'per_group(K=8, permute)'."""
    if isinstance(opt, PerGroup):
        return f"per_group(K={opt.k}, permute)" if opt.permute else f"per_group(K={opt.k})"
    if isinstance(opt, GroupWise):
        return f"group(size={opt.size})"
    if isinstance(opt, RunningMinMax):
        return f"running_minmax(momentum={_num(opt.momentum)})"
    if isinstance(opt, MSE):
        return "mse" if opt.candidates == MSE().candidates else f"mse(candidates={opt.candidates})"
    if isinstance(opt, Percentile):
        return f"percentile({_num(opt.p)})"
    if isinstance(opt, (GPTQ, AWQ)):  # only the arguments that differ from the defaults
        args = [f"{k}={_num(v)}" for k, v in asdict(opt).items()
                if not isinstance(v, bool) and v != getattr(type(opt)(), k)]
        args += [k for k, v in asdict(opt).items() if v is True]
        return f"{opt.name}({', '.join(args)})" if args else opt.name
    return opt.name


def _num(x: float) -> str:
    return repr(x)  # ints stay ints, floats round-trip exactly ('0.9', '1e-05')
