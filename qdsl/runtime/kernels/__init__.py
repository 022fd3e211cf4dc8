"""Kernel dispatch per CPU: one entry per operation, the kernel chosen per
(capability, shape class) by the table (``tuning.py``), never a reference loop.

Entries (2-D inputs; the runtime modules reshape around them):

* ``linear_w8a8(xq, x_scale, x_zp, w, w_scale, w_rowsum, bias)``: w8a8 GEMM / GEMV
  after the activation was quantized (dynamic and static modules);
* ``linear_w8a8_cat(xq, x_scale, x_zp, [(w, w_scale, w_rowsum, bias), ...])``: the same
  for several weights on one input, outputs side by side (one GEMV call in decode);
* ``linear_w8(x, w, w_scale, bias)``: int8 weight-only;
* ``linear_w4(x, W4)``: packed 4-bit weight-only;
* ``linear_w4a8(x, W4, per_token, symmetric)``: the same after 8-bit dynamic quantization
  of x, integer products per group (llama.cpp's Q4_0 x Q8_0 contract), in one kernel;
* ``linear_w4a8_cat(x, [W4, ...], per_token, symmetric)``: the same for several weights on
  one input, outputs side by side (one call in decode);
* ``linear_w1(x, W1)``: packed 1-bit weight-only (XTC's binary weights, ``binary.py``);
* ``linear_w1a8(x, W1, per_token, symmetric)``: the same after 8-bit dynamic
  quantization of x, in one kernel;
* ``embedding_int8(ids, w, w_scale)``: int8 rows;
* ``fake_quant(x, scale, zero_point, bits, symmetric)`` and
  ``dynamic_fake_quant(x, per_token, bits, symmetric)``: simulated quantization of a
  float32 activation in one pass (``qdsl_fakequant.cpp``), bit-identical to
  ``qdsl.quant.primitives.fake_quantize``; None where qdsl's kernel does not take the
  call (no extension, a gradient to keep, parameters it cannot broadcast): the caller
  runs the torch maths.

``report()`` says what runs here (``qdsl bench``, ``qdsl explain --lower int8``):
the capability, whether qdsl's C++ kernels built, and per operation and class the
chosen kernel, or "dequantize + float GEMM" where no integer kernel is eligible or
faster on this CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qdsl.quant.primitives import qrange
from qdsl.runtime.kernels import cext, impls
from qdsl.runtime.kernels.binary import fake_quant_a8
from qdsl.runtime.kernels.cpu import Capability, capability
from qdsl.runtime.kernels.impls import IMPLS, W1, W4, _isa, derived
from qdsl.runtime.kernels.tuning import (CLASSES, DESCRIPTIONS, FLOAT, OPS, Table,
                                        copies_allowed, eligible, reference_paths,
                                        shape_class, table)
from qdsl.runtime.kernels.weights import PackedWeight

__all__ = ["linear_w8a8", "linear_w8a8_cat", "linear_w8", "linear_w4", "linear_w4a8",
           "linear_w4a8_cat", "linear_w1", "linear_w1a8", "embedding_int8", "fake_quant",
           "dynamic_fake_quant", "W4",
           "W1", "PackedWeight", "derived",
           "choose", "report", "table", "Table", "Capability", "capability", "eligible",
           "reference_paths", "shape_class", "IMPLS", "OPS", "CLASSES", "FLOAT"]


@torch.compiler.assume_constant_result
def choose(op: str, m: int, exact: bool = False) -> str:
    """The kernel ``op`` runs for ``m`` activation rows on this machine; ``exact``:
    ``float_gemm``, the fake-quant maths bit for bit (``set lower.compute = fp32``).
    A constant to torch.compile (shapes are static there: the table's choice is fixed)."""
    return FLOAT if exact else table().choose(op, m)


def linear_w8a8(xq: Tensor, x_scale: Tensor, x_zp: Tensor | None, w: Tensor,
                w_scale: Tensor, w_rowsum: Tensor | None, bias: Tensor | None) -> Tensor:
    """``(xq - x_zp) @ w^T * x_scale * w_scale + bias``: xq int8 [M, K]; x_scale and x_zp
    per row ([M, 1] / [M]) or 0-d; x_zp None for symmetric activations."""
    m = xq.shape[0]
    xs, zp = _per_row(x_scale, x_zp, m)
    name = choose("w8a8", m)
    return IMPLS["w8a8"][name](xq.contiguous(), xs, zp, w, w_scale, w_rowsum, bias)


def _per_row(x_scale: Tensor, x_zp: Tensor | None, m: int) -> tuple[Tensor, Tensor | None]:
    """The activation's scale (float32) and zero point (int32) as one value per row."""
    xs = x_scale.float().reshape(-1).expand(m).contiguous()
    zp = None if x_zp is None else x_zp.to(torch.int32).reshape(-1).expand(m).contiguous()
    return xs, zp


def linear_w8a8_cat(xq: Tensor, x_scale: Tensor, x_zp: Tensor | None,
                    weights: list[tuple[Tensor, Tensor, Tensor | None, Tensor | None]]) -> Tensor:
    """``linear_w8a8`` for several ``(w, w_scale, w_rowsum, bias)`` on one input, the
    outputs side by side ``[M, sum N]``: one call of qdsl's GEMV where the table picks it
    (a decode step's q / k / v or gate / up), else one call per weight."""
    m = xq.shape[0]
    if choose("w8a8", m) != "qdsl_w8a8":
        return torch.cat([linear_w8a8(xq, x_scale, x_zp, *w) for w in weights], -1)
    return impls.w8a8_qdsl_cat(xq.contiguous(), *_per_row(x_scale, x_zp, m), weights)


def linear_w8(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None,
              exact: bool = False) -> Tensor:
    """``x @ (w * w_scale)^T + bias``: x float32 [M, K], w int8 [N, K]."""
    m, k = x.shape
    name = choose("w8", m, exact)
    if not impls.w8_supports(name, m, k):
        t = table()
        name = next(c for c in eligible("w8", shape_class(m), t.cap, t.ext)
                    if impls.w8_supports(c, m, k))
    return IMPLS["w8"][name](x.float().contiguous(), w, w_scale, bias)


def linear_w4(x: Tensor, w4: W4, exact: bool = False) -> Tensor:
    """x float32 [M, K] times a packed 4-bit weight (``W4``); a kernel that cannot take
    this group size hands over to ``float_gemm``."""
    name = choose("w4", x.shape[0], exact)
    if not w4.supports(name):
        name = FLOAT
    return IMPLS["w4"][name](x.float().contiguous(), w4)


def linear_w4a8(x: Tensor, w4: W4, per_token: bool, symmetric: bool,
                exact: bool = False) -> Tensor:
    """x float32 [M, K], quantized to 8 bits dynamically (per token or per tensor), times a
    packed 4-bit weight. Symmetric codes: one kernel (the table's ``w4a8`` choice).
    Asymmetric ones (their codes minus the zero point do not fit int8), or a group size the
    kernel's layouts do not take: the fake-quantized x through ``linear_w4``."""
    name = choose("w4a8", x.shape[0], exact)
    x = x.float().contiguous()
    if not symmetric or not w4.supports(name):
        return linear_w4(fake_quant_a8(x, per_token, symmetric), w4, exact)
    return IMPLS["w4a8"][name](x, w4, per_token)


def linear_w4a8_cat(x: Tensor, w4s: list[W4], per_token: bool, symmetric: bool,
                    exact: bool = False) -> Tensor:
    """``linear_w4a8`` for several packed weights on one input, the outputs side by side
    ``[M, sum N]``: one call of qdsl's kernel where the table picks it and every weight
    takes it with one group size (a decode step's q / k / v or gate / up), else one call
    per weight."""
    name = choose("w4a8", x.shape[0], exact)
    if (name != "qdsl_w4a8" or not symmetric or not all(w.supports(name) for w in w4s)
            or len({w.group_size for w in w4s}) != 1):
        return torch.cat([linear_w4a8(x, w, per_token, symmetric, exact) for w in w4s], -1)
    return impls.w4a8_qdsl_cat(x.float().contiguous(), w4s, per_token)


def linear_w1(x: Tensor, w1: W1, exact: bool = False) -> Tensor:
    """x float32 [M, K] times a packed 1-bit weight (``W1``, ``binary.py``)."""
    name = choose("w1", x.shape[0], exact)
    if not w1.supports(name):
        name = FLOAT
    return IMPLS["w1"][name](x.float().contiguous(), w1)


def linear_w1a8(x: Tensor, w1: W1, per_token: bool, symmetric: bool,
                exact: bool = False) -> Tensor:
    """x float32 [M, K], quantized to 8 bits dynamically (per token or per tensor), times
    a packed 1-bit weight: one kernel (``binary.py``)."""
    name = choose("w1a8", x.shape[0], exact)
    if not w1.supports(name):
        name = FLOAT
    return IMPLS["w1a8"][name](x.float().contiguous(), w1, per_token, symmetric)


def embedding_int8(ids: Tensor, w: Tensor, w_scale: Tensor) -> Tensor:
    return IMPLS["embedding_int8"][choose("embedding_int8", ids.numel())](ids, w, w_scale)


@torch.compiler.assume_constant_result     # a compiled graph asks once, while tracing
def _fake_quant_built() -> bool:
    return cext.load()


def _fake_quant_takes(x: Tensor, bits: int, symmetric: bool) -> bool:
    """A float32 CPU activation without a gradient to keep (the kernel keeps no
    straight-through mask), a grid other than 1-bit's, and the extension built."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and not x.requires_grad
            and x.dim() >= 1 and not (bits == 1 and symmetric) and _fake_quant_built())


def _param_axis(x: Tensor, scale: Tensor, zero_point: Tensor) -> int | None:
    """How frozen parameters broadcast against x [..., d]: -1 one pair, 0 one per row
    ([..., 1], per token), 1 one per column ([d]); None: another way (the torch maths)."""
    if scale.dim() > x.dim():
        return None
    if scale.numel() == 1:
        return -1 if zero_point.numel() == 1 else None
    if zero_point.shape != scale.shape:
        return None
    shape = (1,) * (x.dim() - scale.dim()) + tuple(scale.shape)
    if shape[-1] == 1 and shape[:-1] == tuple(x.shape[:-1]):
        return 0
    if shape[-1] == x.shape[-1] and all(n == 1 for n in shape[:-1]):
        return 1
    return None


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int,
               symmetric: bool) -> Tensor | None:
    """``fake_quantize(x, scale, zero_point, bits, symmetric)`` with frozen parameters
    (one pair, one per token or one per hidden column) in one pass of qdsl's kernel,
    bit-identical; None where the kernel does not take it."""
    if not _fake_quant_takes(x, bits, symmetric):
        return None
    axis = _param_axis(x, scale, zero_point)
    if axis is None:
        return None
    qmin, qmax = qrange(bits, symmetric)
    return torch.ops.qdsl_kernels.fake_quant(x, scale, zero_point, axis, qmin, qmax, _isa())


def dynamic_fake_quant(x: Tensor, per_token: bool, bits: int, symmetric: bool) -> Tensor | None:
    """x fake-quantized with the min-max parameters of the whole tensor or of each token
    (``reduce_range`` + ``choose_qparams`` + ``fake_quantize``) in one kernel call,
    bit-identical for finite x; None where the kernel does not take it."""
    if not _fake_quant_takes(x, bits, symmetric):
        return None
    qmin, qmax = qrange(bits, symmetric)
    return torch.ops.qdsl_kernels.dynamic_fake_quant(x, per_token, qmin, qmax, symmetric,
                                                     _isa())


def report(measure: bool = True) -> dict:
    """What runs on this machine: capability, extension, and per ``op/class`` the chosen
    kernel with its description, ``integer`` (False: dequantize + float GEMM) and the
    reference paths refused. ``measure=False`` reports only what this process has
    dispatched (not the choices a cached table holds for operations it never ran)."""
    t = table()
    choices = t.full() if measure else {k: t.choices[k] for k in t.used if k in t.choices}
    rows = {}
    for key, name in sorted(choices.items()):
        op, _, cls = key.partition("/")
        rows[key] = {"kernel": name, "what": DESCRIPTIONS[name],
                     "integer": name != FLOAT,
                     "refused": reference_paths(op, cls, t.cap),
                     "timings_ms": t.timings.get(key, {})}
    return {"capability": t.cap.to_json(), "capability_text": t.cap.describe(),
            "threads": torch.get_num_threads(), "extension": t.ext,
            "extension_missing": cext.why_not(), "cache": str(t.path) if t.path else None,
            "weight_copies": copies_allowed(), "kernels": rows}


def summary_lines(rep: dict) -> list[str]:
    """``report()`` as short lines: one per operation and class."""
    lines = [f"CPU: {rep['capability_text']}; {rep['threads']} thread(s)"]
    if not rep["extension"]:
        lines.append(f"qdsl's C++ kernels unavailable: {rep['extension_missing']}")
    if rep.get("weight_copies"):
        lines.append("kernels that keep a second layout of each weight allowed "
                     "(QDSL_KERNEL_COPIES=1)")
    for key, row in rep["kernels"].items():
        note = "" if row["integer"] else " (no integer kernel is faster here)"
        lines.append(f"{key}: {row['kernel']} - {row['what']}{note}")
    return lines
