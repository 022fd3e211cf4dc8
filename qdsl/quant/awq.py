"""AWQ (Lin et al. 2023): activation-aware per-input-channel scales.

A linear y = W x computes the same as ``(W diag(s)) (x / s)``. Quantizing ``W diag(s)``
instead of W protects the input channels with large activations (their weights get
more of the grid). AWQ takes ``s = mean|x|^a`` (normalised so ``sqrt(max s * min s) =
1``) for a on the grid ``0, 1/grid, ..., (grid-1)/grid`` and keeps the a whose rounded
weight ``Q(W diag(s)) diag(1/s)`` has the smallest output error on the calibration
inputs, ``tr(D H D^T)`` with ``D`` its difference from W and ``H = 2 X X^T / n``
(``weights.output_error``; the same loss GPTQ minimises, so nothing but H and mean|x|
is kept from calibration). a = 0 is s = 1, plain rounding: the search is never worse
than it on the calibration inputs.

With ``clip``, each (row, group) then gets the clipping ratio r of its min-max range
(r in 1, 0.95, ..., 0.55, and the spec observer's own range) with the smallest error
``d H_gg d^T`` on its group's block of H (AWQ's auto_clip); kept only if the whole
rows' error does not grow. Codes and scales are on the spec's grid, for ``W diag(s)``;
the linear's input is multiplied by ``1/s`` (``runtime.inputs.InputScale``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from qdsl.config.rounding import AWQ
from qdsl.config.spec import GroupWise, TensorSpec
from qdsl.quant.primitives import choose_qparams, group_unview, group_view, quantize
from qdsl.quant.weights import codes_with, dequantize_codes, output_error, rtn_codes

CLIP_RATIOS = tuple(1.0 - i / 20 for i in range(10))  # 1.0 .. 0.55, AWQ's max_shrink 0.5


@dataclass
class AWQStats:
    """Output errors (summed over rows) at s = 1 and of the result; the exponent a chosen;
    whether clipping was kept."""

    rtn_error: float
    error: float
    alpha: float
    clipped: bool


def awq_scales(act_mean: Tensor, alpha: float) -> Tensor:
    """``s = mean|x|^alpha``, normalised to ``sqrt(max * min) = 1`` (float32 [in]);
    alpha = 0 gives exactly ones. Channels never seen non-zero keep s = 1 scale-free."""
    m = act_mean.float().clamp(min=1e-8)
    s = m.pow(alpha)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def awq_codes(w: Tensor, h: Tensor, act_mean: Tensor, spec: TensorSpec
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, AWQStats]:
    """``(q int32 [out, in], scale, zero_point, s float32 [in], stats)`` for weight ``w``
    [out, in] with Hessian ``h`` [in, in] and per-channel mean|x| ``act_mean`` [in]:
    ``dequantize(q) / s`` approximates w, and the linear reads ``x / s``."""
    cfg = spec.rounding if isinstance(spec.rounding, AWQ) else AWQ()
    plain = replace(spec, rounding=None)
    w0, hd = w.detach().float(), h.detach().double()
    best = None
    for i in range(cfg.grid):
        alpha = i / cfg.grid
        s = awq_scales(act_mean, alpha)
        q, scale, zp = rtn_codes(w0 * s, plain)
        err = output_error(dequantize_codes(q, plain, scale, zp) / s, w0, hd)
        total = float(err.sum())
        if i == 0:
            rtn_error = total
        if best is None or total < best[0]:
            best = (total, alpha, s, q, scale, zp, err)
    total, alpha, s, q, scale, zp, err = best
    clipped = False
    if cfg.clip:
        cq, cscale, czp = _clip(w0 * s, hd / (s.double()[:, None] * s.double()[None, :]),
                                plain, scale, zp)
        cerr = output_error(dequantize_codes(cq, plain, cscale, czp) / s, w0, hd)
        if float(cerr.sum()) < total:
            q, scale, zp, total, clipped = cq, cscale, czp, float(cerr.sum()), True
    return q, scale, zp, s, AWQStats(rtn_error, total, alpha, clipped)


def _clip(ws: Tensor, hs: Tensor, spec: TensorSpec, scale: Tensor, zp: Tensor):
    """Per (row, group) clipping of the scaled weight ``ws`` with the Hessian of its
    inputs ``hs``: each group's ratio minimises its own block error; candidates the
    min-max range times ``CLIP_RATIOS`` and the observer's (scale, zp)."""
    out, cols = ws.shape
    size = spec.granularity.size if isinstance(spec.granularity, GroupWise) else cols
    if spec.granularity.name == "per_tensor":
        return codes_with(ws, spec, scale, zp), scale, zp  # one range: nothing per row
    v = group_view(ws, size)  # [out, G, size]
    blocks = torch.stack([hs[g:g + size, g:g + size] for g in range(0, cols, size)])  # [G,s,s]
    lo, hi = v.amin(-1, keepdim=True), v.amax(-1, keepdim=True)
    cands = [(scale.view(out, -1, 1), zp.view(out, -1, 1))]
    cands += [choose_qparams(lo * r, hi * r, spec.bits, spec.symmetric) for r in CLIP_RATIOS]
    best_err, best_s, best_z = None, None, None
    for cs, cz in cands:
        qv = quantize(v, cs, cz, spec.bits, spec.symmetric)
        d = ((qv - cz).float() * cs - v).double()
        e = torch.einsum("ogi,gij,ogj->og", d, blocks, d)
        if best_err is None:
            best_err, best_s, best_z = e, cs.expand_as(lo).clone(), cz.expand_as(lo).clone()
        else:
            better = e < best_err
            best_err = torch.where(better, e, best_err)
            best_s = torch.where(better[..., None], cs, best_s)
            best_z = torch.where(better[..., None], cz, best_z)
    q = group_unview(quantize(v, best_s, best_z, spec.bits, spec.symmetric))
    if not isinstance(spec.granularity, GroupWise):  # per channel: [out, 1]
        best_s, best_z = best_s.view(out, 1), best_z.view(out, 1)
    return q, best_s, best_z
