"""The candidate kernels, one function per (operation, candidate), with the
operation's signature (the entry points in ``kernels/__init__.py`` call them):

* ``w8a8``: ``f(xq int8 [M, K], x_scale f32 [M], x_zp int32 [M] | None, w int8 [N, K],
  w_scale f32 [N], w_rowsum int32 [N] | None, bias | None) -> f32 [M, N]``,
  ``(xq - x_zp) @ w^T * x_scale * w_scale + bias``;
* ``w8``: ``f(x f32 [M, K], w, w_scale, bias)``, ``x @ (w * w_scale)^T + bias``;
* ``w4``: ``f(x f32 [M, K], W4)``, W4 the packed weight and its derived forms;
* ``w1``: ``f(x f32 [M, K], W1)``, a packed 1-bit weight (``binary.py``);
* ``w1a8``: ``f(x f32 [M, K], W1, per_token, symmetric)``, x 8-bit dynamic (quantized
  by the kernel);
* ``w4a8``: ``f(x f32 [M, K], W4, per_token)``, x 8-bit symmetric dynamic (quantized by
  the kernel) times a packed 4-bit weight, integer products summed per group;
* ``embedding_int8``: ``f(ids, w, w_scale)``.

Accuracy against the fake-quant maths (tests/runtime/test_kernels.py): the integer
kernels (``qdsl_w8a8``, ``torch_int_mm``) accumulate exactly in int32;
``float_gemm`` of w8a8 is exact while ``K * 127^2 < 2^24`` (K <= 1040) and within
float32 rounding beyond; the float32 kernels (``qdsl_w8``, ``qdsl_w4``, ``float_gemm``)
and ``qdsl_w4a8`` (exact int32 per group, float32 across groups) differ from it by
summation order only (~1e-6 relative); the bf16 ones
(``torch_int8pack_mm``, ``torch_bf16_gemm``, ``torch_int4pack_mm``) round
activations, scales and outputs to bf16 (~4e-3 relative).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from qdsl.runtime.kernels.binary import (W1, fake_quant_a8, random_w1, w1_float, w1_qdsl,
                                         w1a8_float, w1a8_qdsl, w1a8_qdsl_gemm)
from qdsl.runtime.kernels.cpu import capability
from qdsl.runtime.kernels.weights import PackedWeight, contiguous as _c
from qdsl.runtime.packing import dequantize_packed

INT4_GROUPS = (32, 64, 128, 256)   # what aten._weight_int4pack_mm_for_cpu takes
BF16 = frozenset({"torch_int8pack_mm", "torch_bf16_gemm", "torch_int4pack_mm"})  # round to bf16


def derived(owner, slot: str, sources: tuple[Tensor, ...], build):
    """``build()``, computed once per storage of ``sources`` and kept on ``owner`` under
    ``slot`` (not a buffer, so never saved): a kernel's prepacked weight. Loading new
    buffers or moving the module changes their storage, which rebuilds it.

    Under torch.compile (the compiled decode step) a data pointer cannot be read: the
    copy an eager step built (the prefill runs eager) is used as it is, or else built
    inside the compiled graph."""
    if torch.compiler.is_compiling():
        hit = owner.__dict__.get(slot)
        return hit[1] if hit is not None else build()
    key = tuple(t.data_ptr() for t in sources)
    hit = owner.__dict__.get(slot)
    if hit is None or hit[0] != key:
        hit = owner.__dict__[slot] = (key, build())
    return hit[1]


@torch.compiler.assume_constant_result
def _isa() -> int:
    # a constant to torch.compile (the capability is fixed for the process)
    return capability().isa


def _epilogue(acc: Tensor, x_scale: Tensor, x_zp: Tensor | None, w_scale: Tensor,
              w_rowsum: Tensor | None, bias: Tensor | None) -> Tensor:
    """int32 (or integer-valued float) accumulator -> float32 output."""
    if x_zp is not None:
        acc = acc - x_zp[:, None] * w_rowsum
    y = acc.float().mul_(x_scale[:, None]).mul_(w_scale)
    return y if bias is None else y.add_(bias)


# ---------------------------------------------------------------- w8a8

def w8a8_qdsl(xq, x_scale, x_zp, w, w_scale, w_rowsum, bias):
    return torch.ops.qdsl_kernels.w8a8_linear(xq, x_scale, x_zp, _c(w), _c(w_scale),
                                              _c(w_rowsum) if x_zp is not None else None,
                                              _c(bias), _isa())


def w8a8_qdsl_cat(xq, x_scale, x_zp, weights):
    """``w8a8_qdsl`` for several ``(w, w_scale, w_rowsum, bias)``, one kernel call."""
    ws, scales, rowsums, biases = zip(*weights)
    return torch.ops.qdsl_kernels.w8a8_linear_cat(
        xq, x_scale, x_zp, [_c(w) for w in ws], [_c(s) for s in scales],
        [_c(r) if x_zp is not None else None for r in rowsums], [_c(b) for b in biases], _isa())


def w8a8_qdsl_gemm(xq, x_scale, x_zp, w, w_scale, w_rowsum, bias):
    """qdsl's packed GEMM (prefill); the packed weight is built once per weight storage
    and kept on the weight tensor (not a buffer: never saved)."""
    packed = derived(w, "_qdsl_gemm_packed", (w,),
                     lambda: torch.ops.qdsl_kernels.w8a8_pack(w))
    return torch.ops.qdsl_kernels.w8a8_gemm(xq, x_scale, x_zp, packed, w.shape[0], _c(w_scale),
                                            _c(w_rowsum) if x_zp is not None else None,
                                            _c(bias), _isa())


def w8a8_int_mm(xq, x_scale, x_zp, w, w_scale, w_rowsum, bias):
    if xq.shape[1] == 1:   # torch 2.13's _int_mm returns zeros at K = 1, N > 1 (tests)
        return w8a8_float(xq, x_scale, x_zp, w, w_scale, w_rowsum, bias)
    return _epilogue(torch._int_mm(xq, w.t()), x_scale, x_zp, w_scale, w_rowsum, bias)


def w8a8_float(xq, x_scale, x_zp, w, w_scale, w_rowsum, bias):
    acc = nn.functional.linear(xq.float(), w.float())         # integer-valued float32
    if x_zp is not None:
        acc -= x_zp[:, None].float() * w_rowsum.float()
    y = acc.mul_(x_scale[:, None]).mul_(w_scale)
    return y if bias is None else y.add_(bias)


# ---------------------------------------------------------------- w8 weight-only

def w8_qdsl(x, w, w_scale, bias):
    return torch.ops.qdsl_kernels.w8_linear(x, _c(w), _c(w_scale), _c(bias), _isa())


def w8_int8pack(x, w, w_scale, bias):
    y = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), w, w_scale.bfloat16()).float()
    return y if bias is None else y.add_(bias)


def w8_supports(name: str, m: int, k: int) -> bool:
    """torch 2.13's ``_weight_int8pack_mm`` returns garbage or crashes (segfault) for
    some K not a multiple of 32 (1, 9, 24, 40, 65 ...; tests): run it only where safe."""
    return name != "torch_int8pack_mm" or (k % 32 == 0 and m <= 4)


def w8_bf16(x, w, w_scale, bias):
    y = nn.functional.linear(x.bfloat16(), w.bfloat16()).float().mul_(w_scale)
    return y if bias is None else y.add_(bias)


def w8_float(x, w, w_scale, bias):
    return nn.functional.linear(x, w.float() * w_scale[:, None], bias)


# ---------------------------------------------------------------- w4 packed

class W4(PackedWeight):
    """A packed 4-bit weight: ``packed [N, K/2]`` holds codes u = q + 8, low nibble
    first (the fields: ``weights.PackedWeight``)."""

    BITS = 4

    def supports(self, name: str) -> bool:
        if name == "qdsl_w4":
            return self.group_size % 32 == 0 and self.in_features % self.group_size == 0
        if name == "qdsl_w4a8":    # the SIMD layouts (qdsl_w4a8.cpp): groups of whole lanes
            k, gs = self.in_features, self.group_size
            return (k % 32 == 0 and k % gs == 0 and (gs == k or gs in (32, 64) or gs % 128 == 0)
                    and self.packed.device.type == "cpu")
        if name == "torch_int4pack_mm":   # its weight layout needs N % 16 == 0
            return self.group_size in INT4_GROUPS and self.packed.shape[0] % 16 == 0
        return True


def w4_qdsl(x, w4: W4):
    return torch.ops.qdsl_kernels.w4_linear(x, _c(w4.packed), _c(w4.scale), w4.group_size,
                                            _c(w4.bias), _isa())


def _int4_layout(w4: W4) -> tuple[Tensor, Tensor]:
    """(aten's int4 weight layout, bf16 scales and zeros ``[G, N, 2]``)."""
    def build():
        lo, hi = w4.packed & 15, w4.packed >> 4
        u = torch.stack([lo, hi], -1).reshape(w4.packed.shape[0], -1)[:, :w4.in_features]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.to(torch.int32), 1)
        scale = w4.scale.t()                                               # [G, N]
        return packed, torch.stack([scale, torch.zeros_like(scale)], -1).bfloat16().contiguous()
    owner = w4.owner if w4.owner is not None else w4
    return derived(owner, "_int4_packed", (w4.packed, w4.scale), build)


@torch.library.custom_op("qdsl::int4pack_mm", mutates_args=())
def int4pack_mm(x: Tensor, packed: Tensor, group_size: int, scale_zeros: Tensor) -> Tensor:
    """aten's int4 kernel behind an opaque op, for compiled graphs: inductor lowers
    ``_weight_int4pack_mm_for_cpu`` to an extern call that corrupted the heap on
    SmolLM2's w4 artifact with a 1,024-slot cache (torch 2.13: "free(): invalid
    pointer"; eager and this op run clean; tests/runtime/test_compiled_decode.py)."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_zeros)


@int4pack_mm.register_fake
def _(x, packed, group_size, scale_zeros):
    return x.new_empty(x.shape[0], packed.shape[0])


def w4_int4pack(x, w4: W4):
    packed, sz = _int4_layout(w4)
    mm = int4pack_mm if torch.compiler.is_compiling() else \
        torch.ops.aten._weight_int4pack_mm_for_cpu
    y = mm(x.bfloat16(), packed, w4.group_size, sz)
    y = y.float()
    return y if w4.bias is None else y.add_(w4.bias)


def w4_float(x, w4: W4):
    return nn.functional.linear(x, w4.dequant(), w4.bias)


# ---------------------------------------------------------------- w4a8 (x 8-bit dynamic)

def w4a8_qdsl(x, w4: W4, per_token: bool):
    """x quantized to 8 bits (symmetric, per token or per tensor, as the fake-quant) in
    the kernel, then integer products per group (``qdsl_w4a8.cpp``)."""
    return torch.ops.qdsl_kernels.w4a8_linear(x, _c(w4.packed), _c(w4.scale), w4.group_size,
                                              _c(w4.bias), per_token, _isa())


def w4a8_qdsl_cat(x, w4s: list[W4], per_token: bool):
    """``w4a8_qdsl`` for several weights of one group size: x quantized once, one call."""
    return torch.ops.qdsl_kernels.w4a8_linear_cat(
        x, [_c(w.packed) for w in w4s], [_c(w.scale) for w in w4s], w4s[0].group_size,
        [_c(w.bias) for w in w4s], per_token, _isa())


def w4a8_float(x, w4: W4, per_token: bool):
    """The fake-quant maths: quantize-dequantize x, unpack the weight, float32 GEMM."""
    return w4_float(fake_quant_a8(x, per_token, True), w4)


# ---------------------------------------------------------------- int8 embedding

def embedding_gather(ids, w, w_scale):
    return w[ids].float() * w_scale[ids].unsqueeze(-1)


IMPLS: dict[str, dict[str, Callable]] = {
    "w8a8": {"qdsl_w8a8": w8a8_qdsl, "qdsl_w8a8_gemm": w8a8_qdsl_gemm,
             "torch_int_mm": w8a8_int_mm, "float_gemm": w8a8_float},
    "w8": {"qdsl_w8": w8_qdsl, "torch_int8pack_mm": w8_int8pack, "torch_bf16_gemm": w8_bf16,
           "float_gemm": w8_float},
    "w4": {"qdsl_w4": w4_qdsl, "torch_int4pack_mm": w4_int4pack, "float_gemm": w4_float},
    "w4a8": {"qdsl_w4a8": w4a8_qdsl, "float_gemm": w4a8_float},
    "w1": {"qdsl_w1": w1_qdsl, "float_gemm": w1_float},   # binary.py (XTC's 1-bit weights)
    "w1a8": {"qdsl_w1a8": w1a8_qdsl, "qdsl_w1a8_gemm": w1a8_qdsl_gemm,
             "float_gemm": w1a8_float},
    "embedding_int8": {"torch_gather": embedding_gather},
}


def random_w4(k: int, n: int, group_size: int, g: torch.Generator | None = None) -> W4:
    """A random packed w4 weight (benchmarks, tests); its float32
    dequantization unpacks per call, as a loaded weight's does."""
    u = torch.randint(1, 16, (n, k), dtype=torch.uint8, generator=g)
    packed = (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()
    scale = torch.rand(n, k // group_size, generator=g) * 0.01 + 1e-3
    # the per-call unpacking a real weight pays (the kernel table times float_gemm with it)
    return W4(packed, scale, k, group_size, None,
              lambda: dequantize_packed(packed, scale, 4, k))


def bench_case(op: str, name: str, m: int, k: int, n: int) -> Callable[[], Tensor]:
    """A zero-argument call of candidate ``name`` of ``op`` on random [m, k] x [n, k]."""
    g = torch.Generator().manual_seed(0)
    f = IMPLS[op][name]
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    ws = torch.rand(n, generator=g) * 0.01
    x = torch.randn(m, k, generator=g)
    if op == "w8a8":
        xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
        xs = torch.rand(m, generator=g)
        return lambda: f(xq, xs, None, w, ws, None, None)
    if op == "w8":
        return lambda: f(x, w, ws, None)
    if op == "w4":
        w4 = random_w4(k, n, 64, g)
        return lambda: f(x, w4)
    if op == "w4a8":
        w4 = random_w4(k, n, 64, g)
        return lambda: f(x, w4, True)
    if op == "w1":
        w1: W1 = random_w1(k, n, k, g)
        return lambda: f(x, w1)
    if op == "w1a8":
        w1a8 = random_w1(k, n, k, g)
        return lambda: f(x, w1a8, True, True)
    ids = torch.randint(0, n, (1, m), generator=g)
    return lambda: f(ids, w, ws)
