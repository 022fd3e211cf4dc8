"""Int8 runtime modules: real int8 weights in memory and on disk.

Each module is registered buffers and a short forward; ``from_float`` quantizes
a float ``[out, in]`` weight with qdsl's quantizer maths (``qdsl.quant``), and
``config()`` gives the JSON metadata an artifact records.

Kernels: every GEMM goes through ``qdsl.runtime.kernels`` (one entry per operation,
the kernel chosen per CPU capability and shape class, never a reference loop; see
that package and docs/performance.md). Weight-only modules with the default
``compute_dtype="bf16"`` run the table's choice (a bf16 kernel only where it is the
fastest here, ~3e-3 relative); ``"fp32"`` dequantizes and runs one float32 GEMM,
the fake-quant maths bit for bit.

Activations are quantized on the symmetric int8 grid [-127, 127] or the
asymmetric one [0, 255]; the asymmetric code is shifted by -128 to fit int8 and
corrected with the weight's row sums:
``(q - zp) @ W^T = (q - 128) @ W^T - (zp - 128) * rowsum(W)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qdsl.errors import GraphError
from qdsl.runtime import kernels
from qdsl.quant.primitives import choose_qparams, quantize, reduce_range
from qdsl.config.spec import ACTIVATION, WEIGHT, PerChannel, PerTensor, PerToken, TensorSpec

BITS = 8  # the one width these modules run (weights and activations); check_spec refuses others
W8 = TensorSpec(WEIGHT, BITS, symmetric=True, granularity=PerChannel())
A8_DYNAMIC = TensorSpec(ACTIVATION, BITS, symmetric=True, granularity=PerToken(), dynamic=True)
# Int8DynamicLinear's activation granularities, by name (its config records the name)
DYNAMIC_ACT_GRANULARITIES = {g.name: g for g in (PerToken(), PerTensor())}


def check_spec(spec: TensorSpec, bits: tuple[int, ...], granularities: tuple[type, ...],
               what: str, symmetric: bool | None = True) -> None:
    """Raise GraphError unless ``spec`` is something the runtime module can run."""
    ok = (spec.bits in bits and isinstance(spec.granularity, granularities)
          and (symmetric is None or spec.symmetric == symmetric))
    if not ok:
        raise GraphError(f"{what} cannot run {spec.describe()!r}",
                         hint=f"supported: bits {bits}, "
                              f"{'/'.join(g.name for g in granularities)}"
                              + ("" if symmetric is None else ", sym" if symmetric else ", asym"))


def quantize_weight_int8(weight: Tensor, spec: TensorSpec = W8) -> tuple[Tensor, Tensor]:
    """float ``[out, in]`` -> (int8 ``[out, in]``, float32 scale ``[out]``)."""
    check_spec(spec, (BITS,), (PerChannel, PerTensor), "int8 weight")
    lo, hi = reduce_range(weight.detach().float(), spec.granularity, WEIGHT)
    scale, zp = choose_qparams(lo, hi, spec.bits, spec.symmetric)
    q = quantize(weight.detach(), scale, zp, spec.bits, spec.symmetric).to(torch.int8)
    return q, scale.reshape(-1).expand(weight.shape[0]).contiguous()


def quantize_act_int8(x: Tensor, scale: Tensor, zero_point: Tensor,
                      symmetric: bool) -> tuple[Tensor, Tensor]:
    """x ``[M, K]`` -> (int8 code, int32 zero point in that code); asym shifted by -128."""
    shift = 0 if symmetric else 128
    return (quantize(x, scale, zero_point, BITS, symmetric, dtype=torch.int8, offset=shift),
            zero_point - shift)


def int8_matmul(xq: Tensor, x_scale: Tensor, x_zp: Tensor | None, w: Tensor, w_scale: Tensor,
                w_rowsum: Tensor | None, bias: Tensor | None) -> Tensor:
    """``(xq - x_zp) @ w^T * x_scale * w_scale + bias``; xq [M, K] int8, w [N, K] int8,
    the integer product exact (the kernel table's ``w8a8`` entry)."""
    return kernels.linear_w8a8(xq, x_scale, None if w_rowsum is None else x_zp, w, w_scale,
                               w_rowsum, bias)


class _Int8Weight(nn.Module):
    """int8 ``weight [out, in]``, float32 ``weight_scale [out]``, optional float ``bias``."""

    WEIGHT_BUFFERS = ("weight", "weight_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_granularity = "per_channel"
        self.register_buffer("weight", torch.empty(out_features, in_features,
                                                   dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)

    def _load_weight(self, weight: Tensor, bias: Tensor | None, spec: TensorSpec) -> None:
        self.weight, self.weight_scale = quantize_weight_int8(weight, spec)
        self.weight_granularity = spec.granularity.name
        if bias is not None:
            self.bias = bias.detach().float().clone()

    def _set_int8(self, q: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        """Integer codes ``q [out, in]`` with their scale (``[out, 1]``, ``[out]`` or 0-d)."""
        self.weight = q.to(torch.int8)
        self.weight_scale = scale.float().reshape(-1).expand(self.out_features).contiguous()
        self.weight_granularity = "per_tensor" if scale.numel() == 1 else "per_channel"
        if bias is not None:
            self.bias = bias.detach().float().clone()

    @classmethod
    def from_int(cls, q: Tensor, scale: Tensor, bias: Tensor | None = None, **kwargs):
        """From integer codes ``q [out, in]`` (already on the grid) and their weight scale."""
        m = cls(q.shape[1], q.shape[0], bias is not None, device="meta", **kwargs)
        m._set_int8(q, scale, bias)
        return m

    def config(self) -> dict:
        return {"module": type(self).__name__, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None,
                "weight": {"bits": BITS, "symmetric": True, "granularity": self.weight_granularity}}


class Int8DynamicLinear(_Int8Weight):
    """w8a8 with activations quantized at run time, per token (default) or per tensor,
    on the symmetric grid (default) or the asymmetric one (``weight_rowsum`` corrects)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 act_granularity: PerToken | PerTensor | str = "per_token",
                 act_symmetric: bool = True, device=None) -> None:
        super().__init__(in_features, out_features, bias, device)
        g = DYNAMIC_ACT_GRANULARITIES.get(getattr(act_granularity, "name", act_granularity))
        assert g is not None, act_granularity
        self._act_g = g                                      # resolved once, used per forward
        self.act_granularity, self.act_symmetric = g.name, act_symmetric
        if not act_symmetric:
            self.WEIGHT_BUFFERS = ("weight", "weight_scale", "weight_rowsum")
            self.register_buffer("weight_rowsum", torch.empty(out_features, dtype=torch.int32,
                                                              device=device))

    def _set_int8(self, q: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        super()._set_int8(q, scale, bias)
        if not self.act_symmetric:
            self.weight_rowsum = self.weight.sum(1, dtype=torch.int32)

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None,
                   weight_spec: TensorSpec = W8, act_spec: TensorSpec = A8_DYNAMIC):
        check_spec(act_spec, (BITS,), (PerToken, PerTensor), "Int8DynamicLinear activation", None)
        q, scale = quantize_weight_int8(weight, weight_spec)
        m = cls.from_int(q, scale, bias, act_granularity=act_spec.granularity,
                         act_symmetric=act_spec.symmetric)
        m.weight_granularity = weight_spec.granularity.name
        return m

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)                 # [M, K]
        sym = self.act_symmetric
        scale, zp = choose_qparams(*reduce_range(x2, self._act_g, ACTIVATION), BITS, sym)
        xq, zp = quantize_act_int8(x2, scale, zp, sym)       # scale, zp: [M, 1] or 0-d
        y = int8_matmul(xq, scale, None if sym else zp, self.weight, self.weight_scale,
                        None if sym else self.weight_rowsum, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def config(self) -> dict:
        return {**super().config(), "act": {"bits": BITS, "symmetric": self.act_symmetric,
                                            "dynamic": True, "granularity": self.act_granularity}}


class Int8StaticLinear(_Int8Weight):
    """w8a8 with a frozen (calibrated) per-tensor activation scale and zero point."""

    WEIGHT_BUFFERS = ("weight", "weight_scale", "weight_rowsum")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 act_symmetric: bool = False, device=None) -> None:
        super().__init__(in_features, out_features, bias, device)
        self.act_symmetric = act_symmetric
        self.register_buffer("weight_rowsum", torch.empty(out_features, dtype=torch.int32,
                                                          device=device))
        self.register_buffer("input_scale", torch.empty((), device=device))
        self.register_buffer("input_zero_point", torch.empty((), dtype=torch.int32,
                                                             device=device))

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None, act_scale: Tensor | float,
                   act_zero_point: Tensor | int, weight_spec: TensorSpec = W8,
                   act_spec: TensorSpec = TensorSpec(ACTIVATION, BITS, symmetric=False)):
        check_spec(act_spec, (BITS,), (PerTensor,), "Int8StaticLinear activation", None)
        q, scale = quantize_weight_int8(weight, weight_spec)
        m = cls.from_int(q, scale, bias, act_scale, act_zero_point,
                         act_symmetric=act_spec.symmetric)
        m.weight_granularity = weight_spec.granularity.name
        return m

    @classmethod
    def from_int(cls, q: Tensor, scale: Tensor, bias: Tensor | None = None,
                 act_scale: Tensor | float = 1.0, act_zero_point: Tensor | int = 0, **kwargs):
        m = super().from_int(q, scale, bias, **kwargs)
        m.weight_rowsum = m.weight.sum(1, dtype=torch.int32)
        m.input_scale = torch.as_tensor(act_scale, dtype=torch.float32).reshape(())
        m.input_zero_point = torch.as_tensor(act_zero_point, dtype=torch.int32).reshape(())
        return m

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)                 # [M, K]
        xq, zp = quantize_act_int8(x2, self.input_scale, self.input_zero_point,
                                   self.act_symmetric)
        y = int8_matmul(xq, self.input_scale, None if self.act_symmetric else zp,
                        self.weight, self.weight_scale, self.weight_rowsum, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def config(self) -> dict:
        return {**super().config(), "act": {"bits": BITS, "symmetric": self.act_symmetric,
                                            "dynamic": False, "granularity": "per_tensor"}}


class Int8WeightOnlyLinear(_Int8Weight):
    """int8 weights, float activations: the kernel table's ``w8`` entry
    (``compute_dtype="fp32"``: dequantize + float32 GEMM, see the module doc)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 compute_dtype: str = "bf16", device=None) -> None:
        super().__init__(in_features, out_features, bias, device)
        assert compute_dtype in ("bf16", "fp32"), compute_dtype
        self.compute_dtype = compute_dtype

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None,
                   weight_spec: TensorSpec = W8):
        m = cls(weight.shape[1], weight.shape[0], bias is not None, device="meta")
        m._load_weight(weight, bias, weight_spec)
        return m

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)                 # [M, K]
        y = kernels.linear_w8(x2, self.weight, self.weight_scale, self.bias,
                              exact=self.compute_dtype == "fp32")
        return y.reshape(*x.shape[:-1], self.out_features)

    def config(self) -> dict:
        return {**super().config(), "compute_dtype": self.compute_dtype}


class Int8Embedding(nn.Module):
    """int8 rows ``weight [num, dim]`` with one scale per row; only looked-up rows dequantized."""

    WEIGHT_BUFFERS = ("weight", "weight_scale")

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim,
                                                   dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(num_embeddings, device=device))

    @classmethod
    def from_float(cls, weight: Tensor):
        return cls.from_int(*quantize_weight_int8(weight, W8))

    @classmethod
    def from_int(cls, q: Tensor, scale: Tensor):
        """int8 codes ``q [num, dim]`` and a per-row (``[num, 1]``, ``[num]``) or 0-d scale."""
        m = cls(*q.shape, device="meta")
        m.weight = q.to(torch.int8)
        m.weight_scale = scale.float().reshape(-1).expand(q.shape[0]).contiguous()
        return m

    def forward(self, ids: Tensor) -> Tensor:
        return kernels.embedding_int8(ids, self.weight, self.weight_scale)

    def config(self) -> dict:
        return {"module": type(self).__name__, "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim,
                "weight": {"bits": BITS, "symmetric": True, "granularity": "per_channel"}}
