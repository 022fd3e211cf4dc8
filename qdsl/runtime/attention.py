"""The runtime module ``qdsl.passes.fuse_attention`` puts in a graph: float attention as
one ``scaled_dot_product_attention`` over the filled part of the key/value cache, or, for
one query token (a decode step), qdsl's C++ ``decode_attention`` (``kernels/qdsl_kernels.cpp``:
~2x faster than CPU SDPA there; its AVX-512 path for head sizes 64 and 128 where the
capability allows, ``ATEN_CPU_CAPABILITY=avx2`` keeps it on AVX2).

The cache may hold float16 or bfloat16 under float32 queries (half the bytes a decode step
reads): the C++ kernel widens each row as it reads it; SDPA gets the filled part of the
cache converted to the queries' dtype. Both are exact, so the result is the float32
cache's on the same rounded values."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qdsl.runtime import kernels
from qdsl.runtime.kernels.cpu import ISA_AVX2, cpu_flags
from qdsl.runtime.kernels.impls import _isa


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
            cache_position: Tensor | None, scale: float, gqa: bool) -> Tensor:
    kernel = _one_token_kernel(q, k, v, mask)     # reads the first n keys itself
    if kernel and _positions_ok(cache_position):   # n from cache_position, in C++
        return torch.ops.qdsl_kernels.cached_decode_attention(q, k, v, mask,
                                                              cache_position, scale, _isa())
    n = k.shape[2] if cache_position is None else int(cache_position[-1]) + 1
    if kernel:
        return torch.ops.qdsl_kernels.decode_attention(q, k, v, mask, n, scale, _isa())
    if cache_position is not None:
        k, v = k[:, :, :n], v[:, :, :n]
        if mask is not None:
            mask = mask[..., :n]
    if k.dtype != q.dtype or v.dtype != q.dtype:   # a 16-bit cache: widen the filled part only
        k, v = k.to(q.dtype), v.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


# the cache element types the C++ kernel reads (decode_attention in qdsl_kernels.cpp)
_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _one_token_kernel(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> bool:
    """Whether qdsl's C++ decode attention takes this call: one float32 query token on
    the CPU, a float32, float16 or bfloat16 cache (k and v the same), cache rows
    contiguous, head size a multiple of 8, no mask or an additive float one, and the
    extension built on an AVX2 machine or better (CPU SDPA's flash kernel took ~110 us a
    SmolLM2 layer for one token)."""
    if q.shape[-2] != 1 or q.device.type != "cpu" or q.shape[-1] % 8:
        return False
    if q.dtype != torch.float32 or k.dtype != v.dtype or k.dtype not in _CACHE_DTYPES:
        return False
    if k.dtype == torch.float16 and not _f16c_built():
        return False
    d = q.shape[-1]
    if (k.shape[0] != q.shape[0] or v.shape[:2] != k.shape[:2] or q.shape[1] % k.shape[1]
            or k.shape[-1] != d or v.shape[-1] != d):
        return False
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k.stride(-2) != d or v.stride(-2) != d:
        return False
    if mask is not None and (mask.dtype != torch.float32 or mask.dim() != 4
                             or mask.shape[2] != 1 or mask.shape[1] not in (1, q.shape[1])
                             or mask.shape[0] not in (1, q.shape[0])):
        return False
    return _kernel_built()


@torch.compiler.assume_constant_result     # a compiled step asks once, while tracing
def _kernel_built() -> bool:
    return _kernel_ready()


@torch.compiler.assume_constant_result     # asked once while tracing, like _kernel_built
def _f16c_built() -> bool:
    return _has_f16c()


@functools.cache
def _has_f16c() -> bool:
    """Whether the CPU converts float16 (F16C, the fp16 cache's loads): every AVX2 CPU
    known has it; unknown flags (not Linux) are taken to have it."""
    flags = cpu_flags()
    return not flags or "f16c" in flags


@functools.cache
def _kernel_ready() -> bool:
    t = kernels.table()
    return bool(t.ext) and t.cap.isa >= ISA_AVX2


def _positions_ok(cache_position: Tensor | None) -> bool:
    """Whether the C++ op can read the key count from ``cache_position`` itself."""
    return (cache_position is not None and cache_position.dtype == torch.long
            and cache_position.dim() == 1 and cache_position.numel() >= 1
            and cache_position.device.type == "cpu")


@torch.library.custom_op("qdsl::cached_attention", mutates_args=())
def cached_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                     cache_position: Tensor, scale: float, gqa: bool) -> Tensor:
    """``_attend`` as one opaque op: a compiled graph (``qdsl.runtime.compiled``) keeps
    static shapes while the op reads only the filled part of the cache."""
    return _attend(q, k, v, mask, cache_position, scale, gqa)


@cached_attention.register_fake
def _(q, k, v, mask, cache_position, scale, gqa):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


class FusedAttention(nn.Module):
    """``softmax(q @ k^T * scale + mask) @ v`` over the first ``cache_position[-1] + 1``
    keys; ``gqa``: k / v have fewer heads than q (SDPA repeats them)."""

    def __init__(self, scale: float, gqa: bool = False):
        super().__init__()
        self.scale, self.gqa = scale, gqa

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                cache_position: Tensor | None = None) -> Tensor:
        if cache_position is not None and torch.compiler.is_compiling():
            if _one_token_kernel(q, k, v, mask) and _positions_ok(cache_position):
                # decided while tracing (static shapes): the C++ op itself, no Python op
                return torch.ops.qdsl_kernels.cached_decode_attention(
                    q, k, v, mask, cache_position, self.scale, _isa())
            return torch.ops.qdsl.cached_attention(q, k, v, mask, cache_position,
                                                   self.scale, self.gqa)
        return _attend(q, k, v, mask, cache_position, self.scale, self.gqa)

    def to_json(self) -> dict:
        return {"type": type(self).__name__, "scale": self.scale, "gqa": self.gqa}

    @classmethod
    def from_json(cls, config: dict) -> FusedAttention:
        return cls(float(config["scale"]), bool(config["gqa"]))

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, gqa={self.gqa}"
