"""Range estimators (Bondarenko et al. 2021; docs/quantization.md, "Observers").

Each observer is an ``nn.Module`` whose state lives in buffers (so it saves as
safetensors) plus a JSON config (``to_json`` / ``observer_from_json``). Calling
``obs(x)`` records statistics and returns x unchanged; ``obs.qparams()`` gives
``(scale, zero_point)`` shaped to broadcast (``quant.expand_group_params``); for
``per_group(K, permute)`` ``obs.perm`` is the int64 ``[d]`` permutation, taken from
the per-dimension ranges over *all* calibration batches.

Weights are observed once (the tensor itself). Activations are observed once per
calibration batch:

* ``MinMaxObserver``: the range over all batches (the seeds' "all min-max"; the default).
* ``CurrentMinMaxObserver``: the latest batch's range (the seeds' "current min-max").
* ``RunningMinMaxObserver``: EMA, new = m * old + (1 - m) * batch; the first batch initialises.
* ``MSEObserver`` / ``PercentileObserver``: keep the all-batch range and a bounded uniform
  sample (``max_samples`` values); the search / quantile (``qdsl.quant.search``, re-exported
  here) runs once, in ``qparams()``.
* 1-bit symmetric specs get ``MeanAbsObserver``: scale = mean|x| per group (XTC), the
  least-squares scale of a sign code.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qdsl.quant.primitives import (EPS, choose_qparams, dim_range, expand_group_params,
                                   group_values, is_binary, peg_permutation, peg_ranges,
                                   reduce_mean_abs, reduce_range)
from qdsl.config.spec import (ACTIVATION, GRANULARITIES, MSE, WEIGHT, CurrentMinMax, MinMax,
                              Percentile, PerGroup, PerTensor, PerToken, RunningMinMax, TensorSpec,
                              _option_from_json, _option_to_json)
from qdsl.quant.search import kth_percentile, mse_search  # noqa: F401 (re-exported)


class Observer(nn.Module):
    """Common state: bits, grid, granularity, kind; the all-batch per-dim range for PEG."""

    name = "observer"

    def __init__(self, bits: int, symmetric: bool, granularity=PerTensor(),
                 kind: str = ACTIVATION) -> None:
        super().__init__()
        if kind not in granularity.kinds:
            raise ValueError(f"{granularity.name} does not apply to {kind}s")
        if isinstance(granularity, PerToken):
            raise ValueError("per_token ranges are computed at run time: use "
                             "fakequant.DynamicFakeQuant, not an observer")
        self.bits, self.symmetric, self.granularity, self.kind = bits, symmetric, granularity, kind
        self.peg = isinstance(granularity, PerGroup)
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))
        if self.peg:  # all-batch per-dim ranges [d], for the permutation
            self.register_buffer("dim_min_all", torch.empty(0))
            self.register_buffer("dim_max_all", torch.empty(0))

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            xf = x.detach().float()
            if self.peg:
                dmin, dmax = dim_range(xf)
                if self.dim_min_all.numel():
                    dmin, dmax = dmin.minimum(self.dim_min_all), dmax.maximum(self.dim_max_all)
                self.dim_min_all, self.dim_max_all = dmin, dmax
            self._observe(xf)
        return x

    def _observe(self, x: Tensor) -> None:
        raise NotImplementedError

    def _batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """This batch's range: per-dim [d] for PEG (grouped later), else ``reduce_range``."""
        return dim_range(x) if self.peg else reduce_range(x, self.granularity, self.kind)

    @property
    def perm(self) -> Tensor | None:
        """PEG with permute: hidden dims sorted ascending by all-batch range; else None."""
        if not (self.peg and self.granularity.permute):
            return None
        return peg_permutation(self.dim_min_all, self.dim_max_all)

    def ranges(self) -> tuple[Tensor, Tensor]:
        """Clipping range (min, max), shaped to broadcast against the observed tensor."""
        if self.peg:
            return peg_ranges(self.min_val, self.max_val, self.granularity.k, self.perm)
        return self.min_val, self.max_val

    def qparams(self) -> tuple[Tensor, Tensor]:
        if self.min_val.numel() == 0:
            raise RuntimeError(f"{type(self).__name__} has observed no data")
        return choose_qparams(*self.ranges(), self.bits, self.symmetric)

    def options(self) -> dict:
        return {}

    def calib_state(self) -> dict[str, Tensor]:
        """What a calibration checkpoint saves (``qdsl.passes.calibrate``): the buffers."""
        return dict(self.state_dict())

    def load_calib_state(self, state: dict[str, Tensor]) -> None:
        self.load_state_dict(state)

    def to_json(self) -> dict:
        return {"observer": self.name, "bits": self.bits, "symmetric": self.symmetric,
                "granularity": _option_to_json(self.granularity), "kind": self.kind,
                **self.options()}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in list(self._buffers):  # buffers start empty: take the saved shapes
            if prefix + name in state_dict:
                self._buffers[name] = torch.empty_like(state_dict[prefix + name])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MinMaxObserver(Observer):
    """Min-max over everything observed: the tensor's range (weights), the union of all
    calibration batches' ranges (activations; the seeds' "all min-max")."""

    name = MinMax.name

    def _observe(self, x: Tensor) -> None:
        lo, hi = self._batch_range(x)
        if self.min_val.numel():
            lo, hi = lo.minimum(self.min_val), hi.maximum(self.max_val)
        self.min_val, self.max_val = lo, hi


class CurrentMinMaxObserver(Observer):
    """The seeds' "current min-max": the tensor's range (weights), the LATEST batch's
    range (activations), as Bondarenko et al.'s CurrentMinMaxEstimator."""

    name = CurrentMinMax.name

    def _observe(self, x: Tensor) -> None:
        self.min_val, self.max_val = self._batch_range(x)


class RunningMinMaxObserver(Observer):
    """EMA of batch ranges. momentum 0.9, batch ranges (-1, 1) then (-3, 2):
    (-1, 1) -> (0.9 * -1 + 0.1 * -3, 0.9 * 1 + 0.1 * 2) = (-1.2, 1.1). PEG: EMA per dim."""

    name = RunningMinMax.name

    def __init__(self, bits, symmetric, granularity=PerTensor(), kind=ACTIVATION,
                 momentum: float = 0.9) -> None:
        super().__init__(bits, symmetric, granularity, kind)
        self.momentum = float(momentum)

    def _observe(self, x: Tensor) -> None:
        lo, hi = self._batch_range(x)
        if self.min_val.numel():
            m = self.momentum
            lo, hi = m * self.min_val + (1 - m) * lo, m * self.max_val + (1 - m) * hi
        self.min_val, self.max_val = lo, hi

    def options(self) -> dict:
        return {"momentum": self.momentum}


class _SampleObserver(Observer):
    """All-batch range + a bounded uniform sample; the estimate is computed in ``qparams``.

    Weights keep the tensor itself. Activations keep at most ``max_samples`` values
    (per-tensor: single values; PEG: whole rows of d): each batch contributes up to that
    many units drawn uniformly, and a priority (random-key) reservoir keeps a uniform
    sample over all batches of equal size. Seeded, so calibration is reproducible.

    Once the reservoir is full, only a batch's units whose keys fall below its largest
    can enter; they wait in a pending list until they number a reservoir's worth, then
    the reservoir becomes the smallest keys of both (an unordered ``topk``: linear, no
    sort). Reading ``sample`` or ``keys`` (the estimate, a state dict) merges what is
    pending and puts the reservoir in ascending key order, once: the same units in the
    same order as a ``topk`` of every batch's keys with the reservoir's, up to equal keys.
    Calibrating SmolLM2 on 32 windows spent 23 of 61 s in those per-batch merges.
    """

    def __init__(self, bits, symmetric, granularity=PerTensor(), kind=ACTIVATION,
                 max_samples: int = 2**18) -> None:
        super().__init__(bits, symmetric, granularity, kind)
        self.max_samples = int(max_samples)
        self.register_buffer("sample", torch.empty(0))
        self.register_buffer("keys", torch.empty(0))
        self._gen = torch.Generator().manual_seed(0)
        self._reset_pending()

    def _reset_pending(self) -> None:
        self._pending: list[tuple[Tensor, Tensor]] = []   # (units, keys) below the bound
        self._pending_n = 0
        self._bound: Tensor | None = None   # the full reservoir's largest key
        self._unordered = False             # the reservoir is not in ascending key order

    def __getattr__(self, name: str):
        # a read of the reservoir sees everything observed, in ascending key order
        if name in ("sample", "keys") and (self.__dict__.get("_pending")
                                           or self.__dict__.get("_unordered")):
            self._settle()
        return super().__getattr__(name)

    def _select(self) -> None:
        """The reservoir := the smallest keys of it and the pending units (unordered)."""
        buf, pending = self._buffers, self._pending
        self._pending, self._pending_n = [], 0
        units = torch.cat([buf["sample"], *(u for u, _ in pending)])
        keys = torch.cat([buf["keys"], *(k for _, k in pending)])
        keep = keys.topk(buf["keys"].shape[0], largest=False, sorted=False).indices
        buf["sample"], buf["keys"] = units[keep.to(units.device)], keys[keep]
        self._bound, self._unordered = buf["keys"].max(), True

    def _settle(self) -> None:
        if self._pending:
            self._select()
        buf = self._buffers
        keys, order = buf["keys"].sort(stable=True)
        buf["sample"], buf["keys"] = buf["sample"][order.to(buf["sample"].device)], keys
        self._unordered = False

    def _observe(self, x: Tensor) -> None:
        lo, hi = self._batch_range(x)
        if self.kind == WEIGHT:
            self.min_val, self.max_val, self.sample = lo, hi, x
            return
        if self.min_val.numel():
            lo, hi = lo.minimum(self.min_val), hi.maximum(self.max_val)
        self.min_val, self.max_val = lo, hi
        units = x.reshape(-1, x.shape[-1]) if self.peg else x.reshape(-1)  # [N, d] or [N]
        cap = max(1, self.max_samples // (units.shape[1] if self.peg else 1))
        if units.shape[0] > cap:
            units = units[torch.randint(units.shape[0], (cap,), generator=self._gen)
                          .to(units.device)]
        keys = torch.rand(units.shape[0], generator=self._gen)
        buf = self._buffers
        if self._bound is None and buf["keys"].shape[0] == cap:
            self._bound = buf["keys"].max()
        if self._bound is not None:     # full: only keys below its largest can enter
            idx = (keys < self._bound).nonzero()[:, 0]
            if idx.shape[0]:
                self._pending.append((units[idx.to(units.device)], keys[idx]))
                self._pending_n += idx.shape[0]
                if self._pending_n >= cap:
                    self._select()
            return
        if buf["sample"].numel():
            units, keys = torch.cat([buf["sample"], units]), torch.cat([buf["keys"], keys])
        if units.shape[0] > cap:
            keep = keys.topk(cap, largest=False).indices
            units, keys = units[keep.to(units.device)], keys[keep]
        self.sample, self.keys = units, keys

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._pending or self._unordered:
            self._settle()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._reset_pending()

    def calib_state(self) -> dict[str, Tensor]:
        """The buffers and the sampling generator's state: a resumed calibration draws
        the numbers an uninterrupted one would."""
        return {**super().calib_state(), "_gen": self._gen.get_state()}

    def load_calib_state(self, state: dict[str, Tensor]) -> None:
        state = dict(state)
        self._gen.set_state(state.pop("_gen"))
        super().load_calib_state(state)

    def _groups(self) -> tuple[Tensor, Tensor, Tensor]:
        """Sample values per group ``[G, m]`` and each group's full range, two ``[G]``."""
        perm = self.perm
        v = group_values(self.sample, self.granularity, self.kind, perm)
        if self.kind == WEIGHT:
            return v, v.amin(1), v.amax(1)
        if not self.peg:
            return v, self.min_val.reshape(1), self.max_val.reshape(1)
        k = self.granularity.k
        lo, hi = (self.min_val, self.max_val) if perm is None else \
            (self.min_val[perm], self.max_val[perm])
        return v, lo.reshape(k, -1).amin(1), hi.reshape(k, -1).amax(1)

    def _estimate(self, v: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def ranges(self) -> tuple[Tensor, Tensor]:
        lo, hi = self._estimate(*self._groups())
        shape = self.sample.shape
        return (expand_group_params(lo, self.granularity, self.kind, shape, self.perm),
                expand_group_params(hi, self.granularity, self.kind, shape, self.perm))

    def options(self) -> dict:
        return {"max_samples": self.max_samples}


class MSEObserver(_SampleObserver):
    """MSE-optimal clipping (``mse_search``); weights: per group/row, on the whole tensor."""

    name = MSE.name

    def __init__(self, bits, symmetric, granularity=PerTensor(), kind=ACTIVATION,
                 candidates: int = 100, max_samples: int = 2**18) -> None:
        super().__init__(bits, symmetric, granularity, kind, max_samples)
        self.candidates = int(candidates)

    def _estimate(self, v, lo, hi):
        return mse_search(v, lo, hi, self.bits, self.symmetric, self.candidates)

    def options(self) -> dict:
        return {"candidates": self.candidates, **super().options()}


class PercentileObserver(_SampleObserver):
    """Clip at the p-th percentile: of |x| (symmetric), of each tail (asymmetric:
    the (100-p)-th and the p-th). Outliers beyond it are clamped."""

    name = Percentile.name

    def __init__(self, bits, symmetric, granularity=PerTensor(), kind=ACTIVATION,
                 p: float = 99.99, max_samples: int = 2**18) -> None:
        super().__init__(bits, symmetric, granularity, kind, max_samples)
        self.p = float(p)

    def _estimate(self, v, lo, hi):
        if self.symmetric:
            t = kth_percentile(v.abs(), self.p)
            return -t, t
        return -kth_percentile(-v, self.p), kth_percentile(v, self.p)

    def options(self) -> dict:
        return {"p": self.p, **super().options()}


class MeanAbsObserver(Observer):
    """1-bit symmetric (XTC): scale = mean|x| per group, zero point 0.

    mode 'latest' (minmax), 'ema' (running_minmax, with momentum) or 'all' (mse,
    percentile: the mean over all batches, the least-squares optimum). ``min_val`` holds
    mean|x| (per dim for PEG, grouped in ``qparams``); ``max_val`` is unused.
    """

    name = "mean_abs"

    def __init__(self, bits=1, symmetric=True, granularity=PerTensor(), kind=ACTIVATION,
                 mode: str = "latest", momentum: float = 0.9) -> None:
        super().__init__(bits, symmetric, granularity, kind)
        assert is_binary(bits, symmetric), (bits, symmetric)
        assert mode in ("latest", "ema", "all"), mode
        self.mode, self.momentum = mode, float(momentum)
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    def _observe(self, x: Tensor) -> None:
        if self.peg:
            alpha = x.reshape(-1, x.shape[-1]).abs().mean(0)  # [d]
        else:
            alpha = reduce_mean_abs(x, self.granularity, self.kind)
        if self.min_val.numel() and self.mode == "ema":
            alpha = self.momentum * self.min_val + (1 - self.momentum) * alpha
        elif self.min_val.numel() and self.mode == "all":
            w = x.numel() / (self.count + x.numel())
            alpha = ((1 - w) * self.min_val + w * alpha).float()
        self.count += x.numel()
        self.min_val = alpha  # max_val stays empty: one statistic

    def qparams(self) -> tuple[Tensor, Tensor]:
        if self.min_val.numel() == 0:
            raise RuntimeError("MeanAbsObserver has observed no data")
        alpha = self.min_val
        if self.peg:
            perm, k = self.perm, self.granularity.k
            g = (alpha if perm is None else alpha[perm]).reshape(k, -1).mean(1)
            alpha = expand_group_params(g, self.granularity, ACTIVATION, alpha.shape, perm)
        scale = alpha.float().clamp_min(EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)

    def options(self) -> dict:
        return {"mode": self.mode, "momentum": self.momentum}


OBSERVER_TYPES: dict[str, type] = {c.name: c for c in (
    MinMaxObserver, CurrentMinMaxObserver, RunningMinMaxObserver, MSEObserver,
    PercentileObserver, MeanAbsObserver)}


def observer_from_json(config: dict, state: dict[str, Tensor] | None = None) -> Observer:
    """Rebuild an observer from ``to_json()`` and (optionally) its ``state_dict()``."""
    cfg = dict(config)
    cls = OBSERVER_TYPES[cfg.pop("observer")]
    cfg["granularity"] = _option_from_json(cfg["granularity"], GRANULARITIES)
    obs = cls(**cfg)
    if state is not None:
        obs.load_state_dict(state)
    return obs


def make_observer(spec: TensorSpec) -> Observer:
    """The observer a resolved, static, quantized spec asks for.

    >>> from qdsl.config.spec import TensorPatch, resolve
    >>> spec = resolve("weight", TensorPatch(bits=8, observer=MSE(50)))
    >>> make_observer(spec).to_json()["observer"], spec.describe()
    ('mse', 'w8 sym per_channel mse(candidates=50)')
    """
    if not spec.quantized:
        raise ValueError(f"spec {spec.describe()!r} is float: nothing to observe")
    if spec.dynamic or isinstance(spec.granularity, PerToken):
        raise ValueError(f"spec {spec.describe()!r} is dynamic: use fakequant.DynamicFakeQuant")
    args = (spec.bits, spec.symmetric, spec.granularity, spec.kind)
    o = spec.observer
    if is_binary(spec.bits, spec.symmetric):
        mode = {CurrentMinMax: "latest", RunningMinMax: "ema"}.get(type(o), "all")
        return MeanAbsObserver(*args, mode=mode, momentum=getattr(o, "momentum", 0.9))
    if isinstance(o, MinMax):
        return MinMaxObserver(*args)
    if isinstance(o, CurrentMinMax):
        return CurrentMinMaxObserver(*args)
    if isinstance(o, RunningMinMax):
        return RunningMinMaxObserver(*args, momentum=o.momentum)
    if isinstance(o, MSE):
        return MSEObserver(*args, candidates=o.candidates)
    if isinstance(o, Percentile):
        return PercentileObserver(*args, p=o.p)
    raise ValueError(f"unknown observer {o!r}")
