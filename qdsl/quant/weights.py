"""Codes of a constant weight on its spec's grid, and the output error of a choice
of codes on calibration inputs (the loss GPTQ and AWQ minimise).

* ``rtn_codes(w, spec)``: round to nearest with the spec's observer (what ``freeze``
  stores for a spec without ``rounding``); ``dequantize_codes`` is its inverse.
* ``weight_params(w, spec)``: the observer's (scale, zero_point) of ``w`` alone.
* ``output_error(w_hat, w, h)``: per output row, ``(w_hat - w) H (w_hat - w)^T`` with
  ``H = 2 X X^T / n``: twice the mean squared output error of the rounded linear
  over the n calibration inputs (rows of X^T).

Weights are ``[out, in]`` float; group-wise parameters broadcast against
``group_view(w, size)`` (docs/quantization.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qdsl.config.spec import GroupWise, TensorSpec
from qdsl.quant.observers import make_observer
from qdsl.quant.primitives import dequantize, group_unview, group_view, quantize, round_scale_up


def weight_params(w: Tensor, spec: TensorSpec) -> tuple[Tensor, Tensor]:
    """(scale, zero_point) the spec's observer gives for the constant weight ``w``."""
    obs = make_observer(spec)
    obs(w)
    return obs.qparams()


def codes_with(w: Tensor, spec: TensorSpec, scale: Tensor, zero_point: Tensor) -> Tensor:
    """int32 codes [out, in] of ``w`` rounded to nearest with the given parameters."""
    g = spec.granularity
    wf = w.detach().float()
    if isinstance(g, GroupWise):
        return group_unview(quantize(group_view(wf, g.size), scale, zero_point, spec.bits,
                                     spec.symmetric))
    return quantize(wf, scale, zero_point, spec.bits, spec.symmetric)


@torch.no_grad()
def rtn_codes(w: Tensor, spec: TensorSpec, scale_dtype: torch.dtype | None = None
              ) -> tuple[Tensor, Tensor, Tensor]:
    """Round to nearest: ``(q int32 [out, in], scale, zero_point)``, the observer's parameters
    (``scale_dtype``: scales first rounded up to values that dtype holds exactly)."""
    scale, zero_point = weight_params(w.detach().float(), spec)
    if scale_dtype is not None:
        scale = round_scale_up(scale, scale_dtype)
    return codes_with(w, spec, scale, zero_point), scale, zero_point


def dequantize_codes(q: Tensor, spec: TensorSpec, scale: Tensor, zero_point: Tensor) -> Tensor:
    """float32 [out, in] of codes ``q`` [out, in]: ``(q - zero_point) * scale`` per group."""
    g = spec.granularity
    if isinstance(g, GroupWise):
        return group_unview(dequantize(group_view(q, g.size), scale, zero_point))
    return dequantize(q, scale, zero_point)


def output_error(w_hat: Tensor, w: Tensor, h: Tensor) -> Tensor:
    """Per output row r: ``d_r H d_r^T`` with ``d = w_hat - w`` ([out], float64)."""
    d = (w_hat.double() - w.double())
    return ((d @ h.double()) * d).sum(dim=1)
