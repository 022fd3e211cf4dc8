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

from qdsl.runtime import kernels
from qdsl.runtime.packed import PackedDynamicLinear


class BinaryDynamicLinear(PackedDynamicLinear):
    """1-bit weights (``weight_spec``: 1 bit symmetric, per channel or group) with the
    input quantized to 8 bits at run time (``act_spec``: 8-bit dynamic, per token or
    per tensor, symmetric or not)."""

    BITS = 1

    def forward(self, x: Tensor) -> Tensor:
        per_token, symmetric = self._act()
        y = kernels.linear_w1a8(x.reshape(-1, self.in_features), self._w1(), per_token,
                                symmetric, exact=self.compute_dtype == "fp32")
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
