"""The 1-bit weight kernel (XTC's binary weights): ``qdsl_binary.cpp``, a C++ extension
of its own (``torch.ops.qdsl_binary``), built on first use like ``cext.py``'s and with
the same fallbacks (no compiler, not x86-64, ``QDSL_NO_CEXT=1``: ``available()`` is
False and the kernel table runs ``float_gemm``, unpack + float32 GEMM).

A ``W1`` is a packed binary weight: uint8 ``packed [N, ceil(K/8)]``, one bit per
weight (element k of a row in byte k/8 at bit k%8; bit 1 = +scale, bit 0 = -scale),
float32 ``scale [N, K/group_size]`` (XTC's mean|W| per row or group): in memory it is
K/8 bytes a row plus the scales, 1/32 of float32's 4K.

``w1a8`` (XTC's 1W8A, the lowering of a 1-bit linear whose input is 8-bit dynamic)
quantizes x in the kernel exactly as qdsl's fake-quant does (per token or per tensor,
symmetric or not) and sums the integer codes exactly in int32, so one op replaces
the activation quantizer's dozen and the GEMV.

The kernel computes ``y = scale * (2 * sum_{bit 1} x - sum x)`` per group with masked
adds (AVX-512 masks are the weight bits themselves; AVX2 widens 8 bits to a lane mask)
and OpenMP over output rows; its sums differ from the fake-quant maths
(``dequantize + matmul``) by float32 summation order only.

``w1a8_gemm`` (candidate ``qdsl_w1a8_gemm``; the kernel table's first choice at decode
and prefill, timed against the row kernel) computes the same sums with AVX2 int8
instructions: the bits of 8 output rows expanded once to +-1 bytes and reused by every
activation row, 32 products per ``vpsignb`` + ``vpmaddubsw``, the 8 sums reduced and
scaled as one vector; symmetric codes only (they fit int8) and groups of a multiple of
32; its output is ``w1a8_linear``'s bit for bit, which it runs where it does not apply.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from qdsl.config.spec import ACTIVATION, PerTensor, PerToken
from qdsl.quant.primitives import choose_qparams, fake_quantize, reduce_range
from qdsl.runtime.kernels import cext
from qdsl.runtime.kernels.cpu import ISA_AVX2, capability
from qdsl.runtime.kernels.weights import PackedWeight, contiguous as _c
from qdsl.runtime.packing import dequantize_packed

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("qdsl_binary.cpp")
NAME = "qdsl_binary_v2"           # bump with an incompatible change of the op schema
VECTOR_GROUP = 16                 # the vector paths' group-size multiple
GEMM_GROUP = 32                   # w1a8_gemm's group-size multiple

_why_not: list[str] = []


def why_not() -> str | None:
    """Why the 1-bit kernel could not be used, or None."""
    return _why_not[0] if _why_not else None


@functools.cache
def available() -> bool:
    """Build (first use) and load the extension; False (the reason logged once) where it
    cannot be: never raises."""
    reason = cext._precheck()
    if reason is None:
        try:
            if not (hasattr(torch.ops, "qdsl_binary")
                    and hasattr(torch.ops.qdsl_binary, "w1_linear")):
                cext.build(NAME, (SOURCE,))
                _register_fake()
            return True
        except Exception as e:  # noqa: BLE001 - any build failure means "unpack + GEMM"
            msg = str(e).strip().splitlines()[-1][:200] if str(e).strip() else ""
            reason = f"building qdsl's 1-bit kernel failed ({type(e).__name__}: {msg})"
    _why_not.append(reason.replace("qdsl's C++ kernels", "qdsl's 1-bit kernel"))
    log.warning("%s; 1-bit weights are unpacked per call instead", _why_not[0])
    return False


def _register_fake() -> None:
    @torch.library.register_fake("qdsl_binary::w1_linear")
    def _(x, packed, scale, gs, bias, isa):
        return x.new_empty(x.shape[0], packed.shape[0])

    @torch.library.register_fake("qdsl_binary::w1a8_linear")
    def _(x, packed, scale, gs, bias, per_token, symmetric, isa):
        return x.new_empty(x.shape[0], packed.shape[0])

    @torch.library.register_fake("qdsl_binary::w1a8_gemm")
    def _(x, packed, scale, gs, bias, per_token, isa):
        return x.new_empty(x.shape[0], packed.shape[0])


class W1(PackedWeight):
    """A packed 1-bit weight (module docstring; the fields: ``weights.PackedWeight``)."""

    BITS = 1

    def supports(self, name: str) -> bool:
        if name in ("qdsl_w1", "qdsl_w1a8", "qdsl_w1a8_gemm"):
            return self.in_features % self.group_size == 0 and self.packed.device.type == "cpu"
        return True


def w1_qdsl(x: Tensor, w1: W1) -> Tensor:
    return torch.ops.qdsl_binary.w1_linear(x, _c(w1.packed), _c(w1.scale), w1.group_size,
                                           _c(w1.bias), capability().isa)


def w1_float(x: Tensor, w1: W1) -> Tensor:
    """Unpack + dequantize + float32 GEMM (no compiler; the fake-quant maths bit for bit)."""
    return nn.functional.linear(x, w1.dequant(), w1.bias)


def w1a8_qdsl(x: Tensor, w1: W1, per_token: bool, symmetric: bool) -> Tensor:
    """x quantized to 8 bits (per token or per tensor, as the fake-quant) inside the
    kernel, then exact int32 sign-select sums."""
    return torch.ops.qdsl_binary.w1a8_linear(x, _c(w1.packed), _c(w1.scale), w1.group_size,
                                             _c(w1.bias), per_token, symmetric,
                                             capability().isa)


def w1a8_qdsl_gemm(x: Tensor, w1: W1, per_token: bool, symmetric: bool) -> Tensor:
    """``w1a8_qdsl`` by the int8 GEMM for many rows; the row kernel where the GEMM does
    not apply (asymmetric codes, groups not of 32, below AVX2): the same result."""
    isa = capability().isa
    if not symmetric or w1.group_size % GEMM_GROUP or isa < ISA_AVX2:
        return w1a8_qdsl(x, w1, per_token, symmetric)
    return torch.ops.qdsl_binary.w1a8_gemm(x, _c(w1.packed), _c(w1.scale), w1.group_size,
                                           _c(w1.bias), per_token, isa)


def fake_quant_a8(x: Tensor, per_token: bool, symmetric: bool) -> Tensor:
    """x through qdsl's 8-bit dynamic fake-quant (what ``w1a8_linear`` quantizes to)."""
    g = PerToken() if per_token else PerTensor()
    scale, zp = choose_qparams(*reduce_range(x, g, ACTIVATION), 8, symmetric)
    return fake_quantize(x, scale, zp, 8, symmetric)


def w1a8_float(x: Tensor, w1: W1, per_token: bool, symmetric: bool) -> Tensor:
    """The fake-quant maths: quantize-dequantize x, unpack the weight, float32 GEMM."""
    return w1_float(fake_quant_a8(x, per_token, symmetric), w1)


def random_w1(k: int, n: int, group_size: int, g: torch.Generator | None = None) -> W1:
    """A random packed 1-bit weight (benchmarks, tests); its float32
    dequantization unpacks per call, as a loaded weight's does."""
    bits = torch.randint(0, 2, (n, k), dtype=torch.uint8, generator=g)
    shifts = torch.arange(8, dtype=torch.uint8)
    pad = (-k) % 8
    packed = (nn.functional.pad(bits, (0, pad)).reshape(n, -1, 8) << shifts).sum(
        -1, dtype=torch.uint8).contiguous()
    scale = torch.rand(n, k // group_size, generator=g) * 0.01 + 1e-3
    # the per-call unpacking a real weight pays (the kernel table times float_gemm with it)
    return W1(packed, scale, k, group_size, None,
              lambda: dequantize_packed(packed, scale, 1, k))
