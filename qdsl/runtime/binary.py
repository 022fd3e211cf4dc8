"""``BinaryDynamicLinear``: XTC's 1W8A linear in one kernel.

A 1-bit linear (``sign(W) * mean|W|`` per row or group, packed 8 weights a byte as in
``PackedLinear``) whose input the recipe quantizes to 8 bits dynamically (per token or
per tensor). ``lower_int8`` feeds it the float input (the activation quantizer is
taken out of the graph) and the kernel table's ``w1a8`` entry quantizes it exactly as
the fake-quant does and sums the integer codes under the weight bits in int32
(``kernels/binary.py``, ``qdsl_binary.cpp``); where the extension cannot be built it
runs the fake-quant maths (quantize-dequantize x, unpack, float32 GEMM).

Memory: ``weight_packed`` is ``ceil(K/8)`` bytes a row and ``weight_scale`` one float32
per row (or group), about 1/32 of the float32 weight for per-row scales.
"""

from __future__ import annotations

from torch import Tensor

from qdsl.config.spec import PerTensor, PerToken, TensorSpec
from qdsl.errors import GraphError
from qdsl.runtime import kernels
from qdsl.runtime.int8 import check_spec
from qdsl.runtime.packed import PackedLinear


class BinaryDynamicLinear(PackedLinear):
    """1-bit weights (``weight_spec``: 1 bit symmetric, per channel or group) with the
    input quantized to 8 bits at run time (``act_spec``: 8-bit dynamic, per token or
    per tensor, symmetric or not)."""

    def __init__(self, in_features: int, out_features: int, weight_spec: TensorSpec,
                 bias: bool = True, *, act_spec: TensorSpec, compute_dtype: str = "bf16",
                 device=None) -> None:
        super().__init__(in_features, out_features, weight_spec, bias,
                         compute_dtype=compute_dtype, device=device)
        if self.bits != 1:
            raise GraphError(f"BinaryDynamicLinear runs 1-bit weights, got "
                             f"{weight_spec.describe()!r}", hint="use PackedLinear")
        check_spec(act_spec, (8,), (PerToken, PerTensor), "BinaryDynamicLinear activation",
                   None)
        if not act_spec.dynamic:
            raise GraphError(f"BinaryDynamicLinear cannot run {act_spec.describe()!r}",
                             hint="its input must be 8-bit dynamic (per token / per tensor)")
        self.act_spec = act_spec

    @classmethod
    def from_spec(cls, weight_spec: TensorSpec, q: Tensor, scale: Tensor,
                  bias: Tensor | None = None, *, act_spec: TensorSpec,
                  compute_dtype: str = "bf16"):
        """Signed codes ``q [out, in]`` in {-1, +1} and their scales, as PackedLinear's."""
        m = cls(q.shape[1], q.shape[0], weight_spec, bias is not None, act_spec=act_spec,
                compute_dtype=compute_dtype, device="meta")
        m._set_codes(q, scale)
        if bias is not None:
            m.bias = bias.detach().float().clone()
        return m

    def forward(self, x: Tensor) -> Tensor:
        a = self.act_spec
        y = kernels.linear_w1a8(x.reshape(-1, self.in_features), self._w1(),
                                isinstance(a.granularity, PerToken), a.symmetric,
                                exact=self.compute_dtype == "fp32")
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

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
