"""Packed low-bit runtime modules: w4 / w2 / w1 stored packed (``packing.py``),
so the file on disk and the weights in memory really are 1/8 .. 1/32 of float32.

Codes are stored unsigned: for b >= 2 bits on the narrow symmetric grid
``[-(2^(b-1) - 1), 2^(b-1) - 1]`` the stored value is ``q + 2^(b-1)`` (4 bits:
q = -7..7 -> 1..15); for 1 bit (XTC, sign times mean|W|) it is ``(q + 1) / 2``.
Scales are float32 ``[out, in / group_size]`` (one column for per channel). Each
module holds its weight ``TensorSpec`` (``from_spec``: codes on its grid; ``to_json`` /
``from_json`` as the int8 modules); bits and group size are taken from it once
(``packed_layout``).

``PackedLinear`` runs w1 through the kernel table's ``w1`` entry (qdsl's 1-bit
sign-select C++ GEMV, ``kernels/binary.py``, or unpack + float32 GEMM where it cannot
be built; ``compute_dtype="fp32"``: always the latter) and w4 through its ``w4`` entry
(``qdsl.runtime.kernels``: qdsl's fused C++ GEMV reading the packed bytes, torch's
bf16 int4 GEMM ``aten._weight_int4pack_mm_for_cpu`` with group sizes 32..256, or
unpack + float32 GEMM, chosen per CPU and shape class). Other widths, and
``compute_dtype="fp32"``, unpack and dequantize the weight per call (vectorised bit
ops) and run a float32 GEMM: the fake-quant maths bit for bit, slow (w2).

``W4DynamicLinear`` (w4a8) is the 4-bit linear whose input the recipe quantizes to 8
bits dynamically: its kernel quantizes x and multiplies codes in integers
(``qdsl_w4a8.cpp``).
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import Tensor, nn

from qdsl.quant.primitives import choose_qparams, quantize, reduce_mean_abs, reduce_range
from qdsl.errors import GraphError
from qdsl.runtime import kernels
from qdsl.runtime.int8 import EmbeddingJson, SiblingLinears, check_spec
from qdsl.runtime.packing import dequantize_packed, pack_int, packed_len
from qdsl.config.spec import WEIGHT, GroupWise, PerChannel, PerTensor, PerToken, TensorSpec


def weight_spec(bits: int, group_size: int | None = None) -> TensorSpec:
    """Symmetric ``bits``-bit weight spec, per channel or ``group(size=group_size)``."""
    g = GroupWise(group_size) if group_size else PerChannel()
    return TensorSpec(WEIGHT, bits, symmetric=True, granularity=g)


def quantize_packed(weight: Tensor, spec: TensorSpec) -> tuple[Tensor, Tensor]:
    """float ``[out, in]`` -> (uint8 packed ``[out, bytes]``, float32 scale ``[out, G]``)."""
    _, group = packed_layout(spec)
    w = weight.detach().float()
    out, n = w.shape
    size = group or n
    if spec.bits == 1:
        scale = reduce_mean_abs(w, spec.granularity, WEIGHT)        # XTC: mean|W| per group
    else:
        scale, _ = choose_qparams(*reduce_range(w, spec.granularity, WEIGHT), spec.bits, True)
    v = w.reshape(out, n // size, size)                              # [out, G, size]
    q = quantize(v, scale.reshape(out, -1, 1), 0, spec.bits, True)
    return pack_codes(q.reshape(out, n), spec.bits), scale.reshape(out, -1).contiguous()


def pack_codes(q: Tensor, bits: int) -> Tensor:
    """Signed codes on the symmetric grid ``[rows, n]`` -> uint8 packed (stored unsigned)."""
    u = (q + 1) // 2 if bits == 1 else q + 2 ** (bits - 1)
    return pack_int(u, bits)


def packed_layout(spec: TensorSpec) -> tuple[int, int | None]:
    """What a packed module runs of its weight spec, taken once: ``(bits, group size or
    None for per channel)``; GraphError for a spec no packed module runs."""
    check_spec(spec, PACKED_WEIGHT_BITS, (PerChannel, GroupWise), "PackedLinear weight")
    g = spec.granularity
    return spec.bits, (g.size if isinstance(g, GroupWise) else None)


PACKED_WEIGHT_BITS = (1, 2, 4)
W = TypeVar("W", bound=kernels.PackedWeight)


class _PackedWeight(nn.Module):
    """``weight_packed`` uint8 ``[out, bytes]`` and ``weight_scale`` float32 ``[out, G]``;
    ``weight_spec``: the symmetric 1 / 2 / 4-bit spec (per channel or group) of the codes."""

    WEIGHT_BUFFERS = ("weight_packed", "weight_scale")

    def __init__(self, rows: int, cols: int, weight_spec: TensorSpec, device=None) -> None:
        super().__init__()
        self.weight_spec = weight_spec
        self.bits, self.group_size = packed_layout(weight_spec)
        if self.group_size is not None and cols % self.group_size:
            raise GraphError(f"{type(self).__name__}: {cols} input columns do not split into "
                             f"groups of {self.group_size}")
        groups = cols // self.group_size if self.group_size else 1
        self.register_buffer("weight_packed", torch.empty(rows, packed_len(cols, self.bits),
                                                          dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.empty(rows, groups, device=device))

    def _set_codes(self, q: Tensor, scale: Tensor) -> None:
        """Signed codes ``q [rows, cols]`` and scales (``[rows, G]``, ``[rows, G, 1]``, ``[rows, 1]``)."""
        self.weight_packed = pack_codes(q, self.bits)
        self.weight_scale = scale.float().reshape(q.shape[0], -1).contiguous()


class PackedLinear(_PackedWeight):
    """Weight-only w4 / w2 / w1 linear: the int4 kernel (w4, group 32..256, bf16) or
    unpack + dequantize + float32 GEMM."""

    def __init__(self, in_features: int, out_features: int, weight_spec: TensorSpec,
                 bias: bool = True, *, compute_dtype: str = "bf16", device=None) -> None:
        super().__init__(out_features, in_features, weight_spec, device)
        assert compute_dtype in ("bf16", "fp32"), compute_dtype
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None, spec: TensorSpec, **kw):
        """``weight`` quantized on ``spec``'s grid (``kw``: a subclass's own arguments,
        e.g. ``act_spec``)."""
        m = cls(weight.shape[1], weight.shape[0], spec, bias is not None, device="meta", **kw)
        m.weight_packed, m.weight_scale = quantize_packed(weight, spec)
        if bias is not None:
            m.bias = bias.detach().float().clone()
        return m

    @classmethod
    def from_spec(cls, weight_spec: TensorSpec, q: Tensor, scale: Tensor,
                  bias: Tensor | None = None, *, compute_dtype: str = "bf16", **kw):
        """Signed codes ``q [out, in]`` on ``weight_spec``'s grid and their scales
        (``[out, G]``, ``[out, G, 1]``, ``[out, 1]``); ``kw``: a subclass's own arguments
        (``act_spec``)."""
        m = cls(q.shape[1], q.shape[0], weight_spec, bias is not None,
                compute_dtype=compute_dtype, device="meta", **kw)
        m._set_codes(q, scale)
        if bias is not None:
            m.bias = bias.detach().float().clone()
        return m

    def uses_int4_kernel(self) -> bool:
        """Whether forward runs the kernel table's w4 entry (a 4-bit kernel: qdsl's fused
        C++ GEMV or torch's int4 GEMM, by CPU and shape) rather than unpacking per call."""
        return (self.compute_dtype == "bf16" and self.bits == 4
                and (self.group_size or self.in_features) % 32 == 0   # what both take
                and not self.weight_packed.is_meta and self.weight_packed.device.type == "cpu")

    def _kernel_weight(self, cls: type[W]) -> W:
        """This module's packed weight as the kernel table takes it (``kernels.W4`` /
        ``kernels.W1``), the fallback's dequantization per call."""
        assert cls.BITS == self.bits, (cls, self.bits)
        dequant = lambda: dequantize_packed(self.weight_packed, self.weight_scale,  # noqa: E731
                                            self.bits, self.in_features)
        return cls(self.weight_packed, self.weight_scale, self.in_features,
                   self.group_size or self.in_features, self.bias, dequant, owner=self)

    def _w4(self) -> kernels.W4:
        return self._kernel_weight(kernels.W4)

    def _w1(self) -> kernels.W1:
        return self._kernel_weight(kernels.W1)

    def forward(self, x: Tensor) -> Tensor:
        if self.bits == 1 and not self.weight_packed.is_meta \
                and self.weight_packed.device.type == "cpu":
            y = kernels.linear_w1(x.reshape(-1, self.in_features), self._w1(),
                                  exact=self.compute_dtype == "fp32")
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        if not self.uses_int4_kernel():
            w = dequantize_packed(self.weight_packed, self.weight_scale, self.bits,
                                  self.in_features)
            return nn.functional.linear(x, w, self.bias)
        y = kernels.linear_w4(x.reshape(-1, self.in_features), self._w4())
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def to_json(self) -> dict:
        return {"type": type(self).__name__, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None,
                "weight": self.weight_spec.to_json(), "compute_dtype": self.compute_dtype}

    config = to_json  # the name this method had

    @classmethod
    def from_json(cls, config: dict):
        """The empty module (meta device) of a ``to_json()``."""
        return cls(config["in_features"], config["out_features"],
                   TensorSpec.from_json(config["weight"]), config["bias"],
                   compute_dtype=config["compute_dtype"], device="meta")


class PackedDynamicLinear(PackedLinear):
    """A packed linear of ``BITS``-bit weights whose input the recipe quantizes to 8 bits
    at run time (``act_spec``: 8-bit dynamic, per token or per tensor, symmetric or not).
    ``lower_int8`` feeds it the float input (the activation quantizer is taken out of
    the graph); its kernel quantizes x exactly as the fake-quant does. Subclasses:
    ``W4DynamicLinear`` (here), ``BinaryDynamicLinear`` (``binary.py``, XTC's 1W8A)."""

    BITS = 0

    def __init__(self, in_features: int, out_features: int, weight_spec: TensorSpec,
                 bias: bool = True, *, act_spec: TensorSpec, compute_dtype: str = "bf16",
                 device=None) -> None:
        super().__init__(in_features, out_features, weight_spec, bias,
                         compute_dtype=compute_dtype, device=device)
        name = type(self).__name__
        if self.bits != self.BITS:
            raise GraphError(f"{name} runs {self.BITS}-bit weights, got "
                             f"{weight_spec.describe()!r}", hint="use PackedLinear")
        check_spec(act_spec, (8,), (PerToken, PerTensor), f"{name} activation", None)
        if not act_spec.dynamic:
            raise GraphError(f"{name} cannot run {act_spec.describe()!r}",
                             hint="its input must be 8-bit dynamic (per token / per tensor)")
        self.act_spec = act_spec

    def _act(self) -> tuple[bool, bool]:
        """(per token, symmetric) of the input's quantizer."""
        return isinstance(self.act_spec.granularity, PerToken), self.act_spec.symmetric

    def to_json(self) -> dict:
        return {**super().to_json(), "act": self.act_spec.to_json()}

    config = to_json

    @classmethod
    def from_json(cls, config: dict):
        return cls(config["in_features"], config["out_features"],
                   TensorSpec.from_json(config["weight"]), config["bias"],
                   act_spec=TensorSpec.from_json(config["act"]),
                   compute_dtype=config["compute_dtype"], device="meta")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight={self.weight_spec.describe()}, act={self.act_spec.describe()}")


class W4DynamicLinear(PackedDynamicLinear):
    """w4a8: packed 4-bit weights (per channel or group) times the input quantized to 8
    bits at run time, through the kernel table's ``w4a8`` entry (qdsl's C++ kernel:
    the 8-bit codes times the 4-bit codes summed exactly in int32 per group, one float
    multiply per group, as llama.cpp's Q4_0 x Q8_0; or the fake-quant maths, quantize-
    dequantize x, unpack, float32 GEMM, where it cannot run: asymmetric activations,
    another group size, ``compute_dtype="fp32"``)."""

    BITS = 4

    def sibling_key(self) -> tuple:
        """What siblings fused into one ``W4DynamicLinears`` share."""
        return (self.in_features, self.act_spec, self.group_size, self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        per_token, symmetric = self._act()
        y = kernels.linear_w4a8(x.reshape(-1, self.in_features), self._w4(), per_token,
                                symmetric, exact=self.compute_dtype == "fp32")
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class W4DynamicLinears(SiblingLinears):
    """``W4DynamicLinear`` siblings (one activation spec and group size): the input
    quantized once and the weights run in one call of ``kernels.linear_w4a8_cat``."""

    MEMBER = W4DynamicLinear

    def _run(self, x2: Tensor) -> Tensor:
        first = self.members[0]
        per_token, symmetric = first._act()
        return kernels.linear_w4a8_cat(x2, [m._w4() for m in self.members], per_token,
                                       symmetric, exact=first.compute_dtype == "fp32"
                                       ).to(x2.dtype)


class PackedEmbedding(EmbeddingJson, _PackedWeight):
    """Packed embedding rows; only the looked-up rows are unpacked."""

    def __init__(self, num_embeddings: int, embedding_dim: int, weight_spec: TensorSpec,
                 device=None) -> None:
        super().__init__(num_embeddings, embedding_dim, weight_spec, device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    @classmethod
    def from_float(cls, weight: Tensor, spec: TensorSpec):
        m = cls(*weight.shape, spec, "meta")
        m.weight_packed, m.weight_scale = quantize_packed(weight, spec)
        return m

    @classmethod
    def from_spec(cls, weight_spec: TensorSpec, q: Tensor, scale: Tensor):
        m = cls(*q.shape, weight_spec, "meta")
        m._set_codes(q, scale)
        return m

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        rows = dequantize_packed(self.weight_packed[flat], self.weight_scale[flat],
                                 self.bits, self.embedding_dim)
        return rows.reshape(*ids.shape, self.embedding_dim)
