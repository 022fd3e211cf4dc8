"""GPTQ (Frantar et al. 2022): codes of a weight on its spec's grid chosen column by
column, each column's rounding error spread over the columns not yet rounded.

For a linear y = W x with calibration Hessian ``H = 2 X X^T / n`` (``[in, in]``), the
output error of rounded weights W_hat is ``tr((W_hat - W) H (W_hat - W)^T)``
(``weights.output_error``). GPTQ rounds column j, then updates the remaining columns
``W[:, j+1:] -= err_j * U[j, j+1:]`` with ``err_j = (w_j - q_j) / U[j, j]``, U the upper
Cholesky factor of ``(H + damp * mean(diag H) I)^-1``. The updates of a block of
``block`` columns are applied to the later columns at once (lazy batch). Columns whose
input was always zero (``diag H == 0``) get ``H[j, j] = 1``: rounded to nearest, they
spread nothing.

Scales follow the spec: per tensor and per channel from the observer on the original
weight; group-wise from the observer on each group's columns as they are when the
group is reached (updated by the earlier columns; GPTQ's default), or, with
``act_order``, from the original weight's groups (GPTQ's "static groups"): columns are
visited by decreasing ``diag H`` but each keeps the contiguous group of its own index,
so the codes and scales are exactly the spec's grid and need no index map (g_idx).

A final guard compares each output row's error with round-to-nearest's (same loss,
undamped H) and keeps the better one, so the result is never worse than RTN on the
calibration inputs; ``GPTQStats`` counts the rows where RTN won.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from qdsl.config.rounding import GPTQ
from qdsl.config.spec import GroupWise, PerChannel, TensorSpec
from qdsl.quant.primitives import dequantize, quantize
from qdsl.quant.weights import dequantize_codes, output_error, rtn_codes, weight_params


@dataclass
class GPTQStats:
    """What one GPTQ call did: output errors (sum over rows, ``output_error``) of
    round-to-nearest and of the result, rows where RTN was kept, damping used."""

    rtn_error: float
    error: float
    rows_rtn: int
    rows: int
    damp: float


def _inverse_factor(h: Tensor, damp: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1 (float64 maths), and the
    damping used: multiplied by 10 (at most 4 times) while H + damping is not positive
    definite (an H from few tokens)."""
    h = h.double()
    mean = float(torch.diagonal(h).mean()) or 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for _ in range(5):
        chol, info = torch.linalg.cholesky_ex(h + damp * mean * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            up, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return up, damp
        damp *= 10
    raise ValueError(f"GPTQ: the Hessian is not positive definite even with damp={damp / 10:g}")


def _column_params(spec: TensorSpec, cols: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row (scale, zero_point) [out, 1] of the columns ``cols`` [out, m] (a group)."""
    return weight_params(cols, replace(spec, granularity=PerChannel(), rounding=None))


@torch.no_grad()
def gptq_codes(w: Tensor, h: Tensor, spec: TensorSpec) -> tuple[Tensor, Tensor, Tensor, GPTQStats]:
    """``(q int32 [out, in], scale, zero_point, stats)`` of weight ``w`` [out, in] with
    Hessian ``h`` [in, in]; scale / zero_point shaped as the spec's observer shapes them."""
    cfg = spec.rounding if isinstance(spec.rounding, GPTQ) else GPTQ()
    plain = replace(spec, rounding=None)
    w0 = w.detach().float()
    out, cols = w0.shape
    if tuple(h.shape) != (cols, cols):
        raise ValueError(f"GPTQ: Hessian {list(h.shape)} does not fit weight {list(w0.shape)}")
    h = h.detach().double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    group = spec.granularity.size if isinstance(spec.granularity, GroupWise) else None
    if group is not None:  # a group never straddles two blocks: its columns are current
        block = max(group, cfg.block // group * group)
        scale = torch.empty(out, cols // group, 1)
        zero_point = torch.empty(out, cols // group, 1, dtype=torch.int32)
        if cfg.act_order:
            scale, zero_point = weight_params(w0, plain)  # static groups
    else:
        block = cfg.block
        scale, zero_point = weight_params(w0, plain)
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if cfg.act_order \
        else torch.arange(cols)
    wp = w0[:, perm].clone()
    up, damp = _inverse_factor(h[perm][:, perm], cfg.damp)
    up = up.float()
    q = torch.empty(out, cols, dtype=torch.int32)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, err1, u1 = wp[:, i1:i2].clone(), torch.empty(out, i2 - i1), up[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = int(perm[i1 + i])  # the original column
            if group is None:
                s, z = (scale, zero_point) if scale.dim() < 2 else (scale[:, 0], zero_point[:, 0])
            else:
                g = j // group
                if not cfg.act_order and j % group == 0:
                    scale[:, g], zero_point[:, g] = _column_params(spec, w1[:, i:i + group])
                s, z = scale[:, g, 0], zero_point[:, g, 0]
            col = w1[:, i]
            qc = quantize(col, s, z, spec.bits, spec.symmetric)
            q[:, i1 + i] = qc
            e = (col - dequantize(qc, s, z)) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        wp[:, i2:] -= err1 @ up[i1:i2, i2:]
    codes = torch.empty_like(q)
    codes[:, perm] = q
    return _guard(w0, h, spec, codes, scale, zero_point, damp, dead)


def _guard(w0: Tensor, h: Tensor, spec: TensorSpec, codes: Tensor, scale: Tensor,
           zero_point: Tensor, damp: float, dead: Tensor):
    """Keep, per output row, whichever of GPTQ's and round-to-nearest's codes (with their
    own row's parameters) has the smaller output error on the calibration inputs."""
    h = h.clone()
    h[dead, dead] = 0.0  # the calibration error: dead inputs were always zero
    rq, rscale, rzp = rtn_codes(w0, replace(spec, rounding=None))
    err = output_error(dequantize_codes(codes, spec, scale, zero_point), w0, h)
    rerr = output_error(dequantize_codes(rq, spec, rscale, rzp), w0, h)
    rtn = rerr < err
    if bool(rtn.any()):
        codes = torch.where(rtn[:, None], rq, codes)
        if scale.dim() >= 2:  # per row / per (row, group) parameters: take RTN's rows
            shape = (-1,) + (1,) * (scale.dim() - 1)
            scale = torch.where(rtn.view(shape), rscale, scale)
            zero_point = torch.where(rtn.view(shape), rzp, zero_point)
    stats = GPTQStats(float(rerr.sum()), float(torch.minimum(err, rerr).sum()),
                      int(rtn.sum()), int(rtn.numel()), damp)
    return codes, scale, zero_point, stats

