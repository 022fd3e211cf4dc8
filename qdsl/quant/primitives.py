"""Quantizer maths: integer grids, scale/zero point from a range, quantize,
dequantize, fake-quantize with a straight-through gradient, and the
granularity helpers shared by observers, fake-quant and real lowering.

Stateless free functions, torch only. Conventions (docs/quantization.md):

* ``x_hat = (q - zero_point) * scale`` with ``q = clamp(round(x * (1/scale)) + zero_point,
  qmin, qmax)``. ``torch.round`` rounds half to even (the seeds and torch's own
  ``fake_quantize_*`` do the same); multiplying by the float32 reciprocal is what torch's
  kernels do, so ties land on the same integers.
* Weights are ``[out, in]`` (nn.Linear / nn.Embedding layout). A transformers ``Conv1D``
  weight is ``[in, out]``: pass ``w.t()``.
* Activations are ``[..., d]``; the hidden dimension is last.
* ``scale`` and ``zero_point`` broadcast against the tensor they quantize; the caller (an
  observer, or ``reduce_range``) shapes them. ``GroupWise`` parameters broadcast against
  ``group_view(w, size)``, not against ``w``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qdsl.config.spec import (ACTIVATION, WEIGHT, GroupWise, PerChannel, PerGroup, PerTensor,
                              PerToken, check_bits)

EPS = 1e-8  # smallest scale (the seeds clamp their step the same way)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer grid ``(qmin, qmax)``.

    Symmetric grids are *narrow*: ``[-(2^(b-1) - 1), 2^(b-1) - 1]``, so -x quantizes to -q
    and an int8 x int8 GEMM needs no correction term (8 bits: [-127, 127]). The seeds use
    the full grid [-128, 127]; the one extra level at -128 is only reachable from the
    negative side and costs the symmetry. 2 bits symmetric is ternary {-1, 0, 1}.
    1 bit symmetric is {-1, +1} (sign times scale, XTC; no zero level). Asymmetric grids
    are unsigned ``[0, 2^b - 1]`` (1 bit: {0, 1}).

    >>> qrange(8, True), qrange(4, False), qrange(1, True)
    ((-127, 127), (0, 15), (-1, 1))
    """
    check_bits(bits)  # the spec's one check (SpecError, a ValueError)
    if not symmetric:
        return 0, 2**bits - 1
    if bits == 1:
        return -1, 1
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1


def is_binary(bits: int, symmetric: bool) -> bool:
    """1-bit symmetric: x_hat = sign(x) * scale, sign(0) = +1."""
    return bits == 1 and symmetric


def choose_qparams(min_val: Tensor, max_val: Tensor, bits: int,
                   symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale (float32, >= 1e-8) and zero point (int32) for the range [min_val, max_val].

    Symmetric: ``scale = max(|min|, |max|) / qmax``, zero point 0.
    Asymmetric: the range is first widened to include 0 (so 0 is exactly representable),
    ``scale = (max - min) / (qmax - qmin)``, ``zero_point = qmin - round(min / scale)``.

    Worked example, the range (-3.5, 10.2) at 4 bits asymmetric (grid [0, 15]):
    scale = 13.7 / 15 = 0.9133, zero point = round(3.5 / 0.9133) = round(3.83) = 4;
    x = 0 -> q = 4 -> 0.0 exactly, x = 10.2 -> q = 15 -> 10.05, x = -3.5 -> q = 0 -> -3.65.
    Symmetric 4 bits (grid [-7, 7]): scale = 10.2 / 7 = 1.457, zero point 0.
    Shapes are kept: per-channel ``[out, 1]`` in, ``[out, 1]`` out.
    """
    qmin, qmax = qrange(bits, symmetric)
    min_val, max_val = min_val.float(), max_val.float()
    if symmetric:
        amax = torch.maximum(min_val.abs(), max_val.abs())
        scale = (amax / qmax).clamp_min(EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    lo, hi = min_val.clamp(max=0.0), max_val.clamp(min=0.0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def round_scale_up(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """float32 ``scale`` rounded up to the nearest value of ``dtype`` (fp16 for GGUF's
    block scales), still float32: the codes computed with it never clip more than
    with ``scale``, and ``dtype`` holds it exactly (``set export = gguf``).

    >>> round_scale_up(torch.tensor([0.1, 0.5]), torch.float16).tolist()
    [0.10003662109375, 0.5]
    """
    low = scale.to(dtype)
    inf = torch.full_like(low, float("inf"))
    up = torch.where(low.float() < scale, torch.nextafter(low, inf), low)
    return up.float()


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int,
             symmetric: bool, *, dtype: torch.dtype = torch.int32, offset: int = 0) -> Tensor:
    """Integers on the grid, as an int32 tensor (cast to int8 / pack in the lowering).

    ``offset`` is subtracted from every code and ``dtype`` is the result's type, so a
    runtime module gets its storage codes in one pass (asymmetric 8-bit codes
    [0, 255] - 128 fit int8).

    >>> s, z = choose_qparams(torch.tensor(-3.5), torch.tensor(10.2), 4, False)
    >>> quantize(torch.tensor([-9.0, 0.0, 0.4566, 0.4567, 20.0]), s, z, 4, False).tolist()
    [0, 4, 4, 5, 15]

    (0.4566 / 0.9133 = 0.49995 rounds down, 0.4567 up; out-of-range values clamp.)
    1 bit symmetric returns sign(x) in {-1, +1} with sign(0) = +1.
    """
    if is_binary(bits, symmetric):
        return torch.where(x >= 0, 1, -1).to(torch.int32)
    qmin, qmax = qrange(bits, symmetric)
    q = x.float() * (1.0 / scale)          # one new tensor, then in place: large activations
    q.round_().add_(zero_point - offset)    # pay a page-faulting allocation per temporary
    return q.clamp_(qmin - offset, qmax - offset).to(dtype)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """float32 ``(q - zero_point) * scale``."""
    return (q.to(torch.int32) - zero_point).float() * scale


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int,
                  symmetric: bool) -> Tensor:
    """``dequantize(quantize(x))`` in x's dtype, with a straight-through gradient.

    The gradient w.r.t. x is 1 where ``round(x / scale) + zero_point`` lies on the grid and
    0 where it was clamped (as torch.fake_quantize_per_tensor_affine). 1 bit symmetric
    passes the gradient everywhere (XTC's BinaryQuantizer). No gradient to scale.

    Per-tensor and single-axis parameters on float32 run through torch's fused kernels
    (one pass, 3-5x faster; bit-identical, tested); other cases (and meta tensors, which
    the fused kernels do not support) use the reference maths.
    """
    if x.dtype == torch.float32 and not x.is_meta and not is_binary(bits, symmetric):
        fused = _fused_fake_quantize(x, scale, zero_point, *qrange(bits, symmetric))
        if fused is not None:
            return fused
    xf = x.detach().float()
    if is_binary(bits, symmetric):
        x_hat = torch.where(xf >= 0, 1.0, -1.0) * scale
        inside = None
    else:
        qmin, qmax = qrange(bits, symmetric)
        q = torch.round(xf * (1.0 / scale)) + zero_point
        x_hat = (q.clamp(qmin, qmax) - zero_point) * scale
        inside = (q >= qmin) & (q <= qmax)
    x_hat = x_hat.to(x.dtype)
    if not x.requires_grad:
        return x_hat
    ste = x - x.detach()  # value 0, gradient 1
    return x_hat + (ste if inside is None else ste * inside)


def _fused_fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int,
                         qmax: int) -> Tensor | None:
    """torch's fused fake-quant when the parameters are one scalar or vary along one axis."""
    scale = scale.float()
    zero_point = zero_point.to(torch.int32)
    if scale.numel() == 1:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()),
                                                     zero_point.reshape(()), qmin, qmax)
    if scale.dim() > x.dim():
        return None
    shape = (1,) * (x.dim() - scale.dim()) + tuple(scale.shape)
    axes = [i for i, n in enumerate(shape) if n != 1]
    if len(axes) != 1 or shape[axes[0]] != x.shape[axes[0]] or zero_point.numel() != scale.numel():
        return None
    return torch.fake_quantize_per_channel_affine(x, scale.reshape(-1), zero_point.reshape(-1),
                                                  axes[0], qmin, qmax)


def binarize(w: Tensor, granularity=PerChannel(), kind: str = WEIGHT) -> Tensor:
    """XTC 1-bit: ``sign(w) * mean|w|`` per group (per output row for PerChannel).

    sign(0) = +1. mean|w| is the least-squares scale for a sign code, so every observer
    gives it for 1-bit symmetric specs. ``[[0.5, -1.5], [0, 2]]`` per channel ->
    ``[[1, -1], [1, 1]]`` times ``[[1.0], [1.0]]``.
    """
    alpha = reduce_mean_abs(w, granularity, kind)
    if isinstance(granularity, GroupWise):
        v = group_view(w, granularity.size)
        return group_unview(fake_quantize(v, alpha, torch.zeros_like(alpha), 1, True))
    return fake_quantize(w, alpha, torch.zeros_like(alpha), 1, True)


# --------------------------------------------------------------------------
# Granularity: which values share one (scale, zero point).


def group_view(w: Tensor, size: int) -> Tensor:
    """``[out, in] -> [out, in/size, size]``: groups of ``size`` consecutive input columns."""
    if w.dim() != 2 or w.shape[1] % size != 0:
        raise ValueError(f"group(size={size}) needs a 2-D weight [out, in] with in a multiple "
                         f"of {size}; got shape {list(w.shape)}")
    return w.reshape(w.shape[0], w.shape[1] // size, size)


def group_unview(v: Tensor) -> Tensor:
    """Inverse of ``group_view``: ``[out, in/size, size] -> [out, in]``."""
    return v.reshape(v.shape[0], -1)


def inverse_permutation(perm: Tensor) -> Tensor:
    """``x[..., perm][..., inverse_permutation(perm)] == x``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def peg_permutation(dim_min: Tensor, dim_max: Tensor) -> Tensor:
    """PEG: int64 ``[d]`` ordering the hidden dims ascending by range (max - min).

    Stable, so equal ranges keep their order. Ranges (4, 1, 9) -> perm (1, 0, 2).
    """
    return torch.sort(dim_max - dim_min, stable=True).indices


def _check_granularity(granularity, kind: str) -> None:
    if kind not in (WEIGHT, ACTIVATION):
        raise ValueError(f"kind must be {WEIGHT!r} or {ACTIVATION!r}, got {kind!r}")
    if kind not in granularity.kinds:
        raise ValueError(f"{granularity.name} does not apply to {kind}s")


def _peg_size(d: int, k: int) -> int:
    if d % k != 0:
        raise ValueError(f"per_group(K={k}) needs the hidden dim to be a multiple of {k}; "
                         f"got d = {d}")
    return d // k


def group_values(x: Tensor, granularity, kind: str, perm: Tensor | None = None) -> Tensor:
    """The values of each quantization group as rows: ``[G, m]``.

    weight [out, in]: PerTensor [1, out*in], PerChannel [out, in], GroupWise [out*in/size, size];
    activation [..., d]: PerTensor [1, N*d], PerToken [N, d], PerGroup(k) [k, N*d/k] (columns
    taken in ``perm`` order, default identity). ``expand_group_params`` maps ``[G]`` back.
    """
    _check_granularity(granularity, kind)
    if isinstance(granularity, PerTensor):
        return x.reshape(1, -1)
    if isinstance(granularity, PerChannel):
        return x.reshape(x.shape[0], -1)
    if isinstance(granularity, GroupWise):
        return group_view(x, granularity.size).reshape(-1, granularity.size)
    d = x.shape[-1]
    rows = x.reshape(-1, d)  # [N, d]
    if isinstance(granularity, PerToken):
        return rows
    m = _peg_size(d, granularity.k)
    if perm is not None:
        rows = rows[:, perm]
    return rows.reshape(-1, granularity.k, m).transpose(0, 1).reshape(granularity.k, -1)


def expand_group_params(p: Tensor, granularity, kind: str, shape: torch.Size,
                        perm: Tensor | None = None) -> Tensor:
    """``[G]`` per-group values -> a tensor broadcasting against ``shape`` (see module doc).

    PerTensor: scalar; PerChannel: [out, 1]; GroupWise: [out, in/size, 1];
    PerToken: [..., 1]; PerGroup: [d], constant within each group, un-permuted:
    d = 4, k = 2, perm (1, 0, 2, 3), groups (a, b) -> (a, a, b, b) in permuted order ->
    dim 1 and dim 0 get a, dims 2 and 3 get b.
    """
    _check_granularity(granularity, kind)
    if isinstance(granularity, PerTensor):
        return p.reshape(())
    if isinstance(granularity, PerChannel):
        return p.reshape(shape[0], *[1] * (len(shape) - 1))
    if isinstance(granularity, GroupWise):
        return p.reshape(shape[0], shape[1] // granularity.size, 1)
    if isinstance(granularity, PerToken):
        return p.reshape(*shape[:-1], 1)
    d = shape[-1]
    flat = p.repeat_interleave(_peg_size(d, granularity.k))  # [d], permuted order
    if perm is None:
        return flat
    out = torch.empty_like(flat)
    out[perm] = flat
    return out


def min_max(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``(x.amin(dim), x.amax(dim))``. Not ``torch.aminmax``: on this CPU build it is 5-20x
    slower than the two reductions (0.6 ms vs 0.03 ms for a [512, 576] per-token range)."""
    return x.amin(dim), x.amax(dim)


def dim_range(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per hidden dimension min and max of an activation ``[..., d]``: two ``[d]``."""
    rows = x.reshape(-1, x.shape[-1])
    return min_max(rows, 0)


def peg_ranges(dim_min: Tensor, dim_max: Tensor, k: int,
               perm: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Group per-dimension ranges ``[d]`` into k groups -> ``[d]`` min and max vectors.

    A group's min is the min of its dims' mins (exactly the min over its values).
    """
    d = dim_min.shape[0]
    m = _peg_size(d, k)
    pm, px = (dim_min, dim_max) if perm is None else (dim_min[perm], dim_max[perm])
    gmin, gmax = pm.reshape(k, m).amin(1), px.reshape(k, m).amax(1)
    g = PerGroup(k)
    return (expand_group_params(gmin, g, ACTIVATION, dim_min.shape, perm),
            expand_group_params(gmax, g, ACTIVATION, dim_min.shape, perm))


def reduce_range(x: Tensor, granularity, kind: str) -> tuple[Tensor, Tensor]:
    """(min, max) of each quantization group, shaped to broadcast (see ``expand_group_params``).

    PerGroup with ``permute`` takes the permutation from x's own per-dim ranges (an
    observer takes it from all calibration batches instead).
    """
    _check_granularity(granularity, kind)
    if isinstance(granularity, PerGroup):
        dmin, dmax = dim_range(x)
        perm = peg_permutation(dmin, dmax) if granularity.permute else None
        return peg_ranges(dmin, dmax, granularity.k, perm)
    lo, hi = min_max(group_values(x, granularity, kind), 1)
    return (expand_group_params(lo, granularity, kind, x.shape),
            expand_group_params(hi, granularity, kind, x.shape))


def reduce_mean_abs(x: Tensor, granularity, kind: str) -> Tensor:
    """mean|x| of each group (the 1-bit scale), shaped like ``reduce_range``'s output."""
    perm = None
    if isinstance(granularity, PerGroup) and granularity.permute:
        perm = peg_permutation(*dim_range(x))
    v = group_values(x, granularity, kind, perm)
    return expand_group_params(v.abs().float().mean(1), granularity, kind, x.shape, perm)
