"""Int8 runtime modules: real int8 weights in memory and on disk.

Each module is registered buffers and a short forward, built from the ``TensorSpec``s
it runs (weight; activation for w8a8), which it holds and checks once:
``from_spec(weight_spec, codes, scale, ...)`` takes integer codes already on the spec's
grid (what ``freeze`` computed; ``passes.lower_int8``), ``from_float`` quantizes a float
``[out, in]`` weight with qdsl's quantizer maths (``qdsl.quant``). ``to_json()`` is the
specs in their own JSON (``TensorSpec.to_json``) with the shapes; ``from_json`` rebuilds
the empty module on the meta device for ``load_state_dict(..., assign=True)``.

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
W8_GRANULARITIES = (PerChannel, PerTensor)
A8_DYNAMIC = TensorSpec(ACTIVATION, BITS, symmetric=True, granularity=PerToken(), dynamic=True)
A8_STATIC = TensorSpec(ACTIVATION, BITS, symmetric=False, granularity=PerTensor())


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
    check_spec(spec, (BITS,), W8_GRANULARITIES, "int8 weight")
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
    """int8 ``weight [out, in]``, float32 ``weight_scale [out]``, optional float ``bias``;
    ``weight_spec``: the w8 spec the codes are on (per channel, or per tensor: its one
    scale repeated per row)."""

    WEIGHT_BUFFERS = ("weight", "weight_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 weight_spec: TensorSpec = W8, device=None) -> None:
        super().__init__()
        check_spec(weight_spec, (BITS,), W8_GRANULARITIES, f"{type(self).__name__} weight")
        self.in_features, self.out_features = in_features, out_features
        self.weight_spec = weight_spec
        self.register_buffer("weight", torch.empty(out_features, in_features,
                                                   dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)

    def _set_int8(self, q: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        """Integer codes ``q [out, in]`` with their scale (``[out, 1]``, ``[out]`` or 0-d)."""
        self.weight = q.to(torch.int8).contiguous()   # GPT-2's Conv1D codes come transposed
        self.weight_scale = scale.float().reshape(-1).expand(self.out_features).contiguous()
        if bias is not None:
            self.bias = bias.detach().float().clone()

    def _specs(self) -> dict:
        """The constructor's spec keywords (what ``to_json`` records besides shapes)."""
        return {"weight_spec": self.weight_spec}

    @classmethod
    def from_spec(cls, weight_spec: TensorSpec, q: Tensor, scale: Tensor,
                  bias: Tensor | None = None, **specs):
        """Integer codes ``q [out, in]`` on ``weight_spec``'s grid and their scale
        (``[out, 1]``, ``[out]`` or 0-d); ``specs``: the class's other keywords."""
        m = cls(q.shape[1], q.shape[0], bias is not None, weight_spec=weight_spec,
                device="meta", **specs)
        m._set_int8(q, scale, bias)
        return m

    def to_json(self) -> dict:
        out = {"type": type(self).__name__, "in_features": self.in_features,
               "out_features": self.out_features, "bias": self.bias is not None}
        for k, v in self._specs().items():
            out[k.removesuffix("_spec")] = v.to_json() if isinstance(v, TensorSpec) else v
        return out

    config = to_json  # the name this method had

    @classmethod
    def from_json(cls, config: dict):
        """The empty module (meta device) of a ``to_json()``."""
        kw = {k: config[k] for k in config
              if k not in ("type", "in_features", "out_features", "bias")}
        specs = {f"{k}_spec": TensorSpec.from_json(v) for k, v in kw.items() if k in SPEC_KEYS}
        rest = {k: v for k, v in kw.items() if k not in SPEC_KEYS}
        return cls(config["in_features"], config["out_features"], config["bias"],
                   device="meta", **specs, **rest)


SPEC_KEYS = ("weight", "act")  # to_json keys holding a TensorSpec's JSON


class Int8DynamicLinear(_Int8Weight):
    """w8a8 with activations quantized at run time, per token (default) or per tensor,
    on the symmetric grid (default) or the asymmetric one (``weight_rowsum`` corrects)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 weight_spec: TensorSpec = W8, act_spec: TensorSpec = A8_DYNAMIC,
                 device=None) -> None:
        super().__init__(in_features, out_features, bias, weight_spec=weight_spec,
                         device=device)
        check_spec(act_spec, (BITS,), (PerToken, PerTensor), "Int8DynamicLinear activation",
                   None)
        if not (act_spec.dynamic or isinstance(act_spec.granularity, PerToken)):
            raise GraphError(f"Int8DynamicLinear cannot run {act_spec.describe()!r}",
                             hint="a static activation runs as Int8StaticLinear")
        self.act_spec = act_spec
        if not self.act_symmetric:
            self.WEIGHT_BUFFERS = ("weight", "weight_scale", "weight_rowsum")
            self.register_buffer("weight_rowsum", torch.empty(out_features, dtype=torch.int32,
                                                              device=device))

    @property
    def act_symmetric(self) -> bool:
        return self.act_spec.symmetric

    def _specs(self) -> dict:
        return {**super()._specs(), "act_spec": self.act_spec}

    def _set_int8(self, q: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        super()._set_int8(q, scale, bias)
        if not self.act_symmetric:
            self.weight_rowsum = self.weight.sum(1, dtype=torch.int32)

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None,
                   weight_spec: TensorSpec = W8, act_spec: TensorSpec = A8_DYNAMIC):
        q, scale = quantize_weight_int8(weight, weight_spec)
        return cls.from_spec(weight_spec, q, scale, bias, act_spec=act_spec)

    def sibling_key(self) -> tuple:
        """What siblings fused into one ``Int8DynamicLinears`` share."""
        return (self.in_features, self.act_spec)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)                 # [M, K]
        a = self.act_spec
        scale, zp = choose_qparams(*reduce_range(x2, a.granularity, ACTIVATION), BITS,
                                   a.symmetric)
        xq, zp = quantize_act_int8(x2, scale, zp, a.symmetric)   # scale, zp: [M, 1] or 0-d
        y = int8_matmul(xq, scale, None if a.symmetric else zp, self.weight, self.weight_scale,
                        None if a.symmetric else self.weight_rowsum, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


class SiblingLinears(nn.Module):
    """Sibling linears on one input (a layer's q / k / v, gate / up: one ``MEMBER`` type,
    one ``sibling_key()``) as one module: ``_run`` runs them on the input as one kernel
    call, ``[M, sum N]``; forward returns the members' outputs as a tuple. The members are
    held, not copied (``qdsl.runtime.compiled.fuse_siblings`` puts it in a decode step's
    graph). Subclasses: ``Int8DynamicLinears`` (here), ``packed.W4DynamicLinears``."""

    MEMBER: type

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        first = members[0]
        assert len(members) > 1 and all(
            type(m) is self.MEMBER and m.sibling_key() == first.sibling_key()
            for m in members), members
        self.members = nn.ModuleList(members)

    def _run(self, x2: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        y = self._run(x.reshape(-1, self.members[0].in_features))
        outs = y.split([m.out_features for m in self.members], -1)
        return tuple(o.reshape(*x.shape[:-1], o.shape[-1]) for o in outs)


class Int8DynamicLinears(SiblingLinears):
    """``Int8DynamicLinear`` siblings: the input quantized once, the weights in one call of
    ``kernels.linear_w8a8_cat``."""

    MEMBER = Int8DynamicLinear

    def _run(self, x2: Tensor) -> Tensor:
        a = self.members[0].act_spec
        scale, zp = choose_qparams(*reduce_range(x2, a.granularity, ACTIVATION), BITS,
                                   a.symmetric)
        xq, zp = quantize_act_int8(x2, scale, zp, a.symmetric)
        return kernels.linear_w8a8_cat(
            xq, scale, None if a.symmetric else zp,
            [(m.weight, m.weight_scale, None if a.symmetric else m.weight_rowsum, m.bias)
             for m in self.members])


class Int8StaticLinear(_Int8Weight):
    """w8a8 with a frozen (calibrated) per-tensor activation scale and zero point."""

    WEIGHT_BUFFERS = ("weight", "weight_scale", "weight_rowsum")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 weight_spec: TensorSpec = W8, act_spec: TensorSpec = A8_STATIC,
                 device=None) -> None:
        super().__init__(in_features, out_features, bias, weight_spec=weight_spec,
                         device=device)
        check_spec(act_spec, (BITS,), (PerTensor,), "Int8StaticLinear activation", None)
        if act_spec.dynamic:
            raise GraphError(f"Int8StaticLinear cannot run {act_spec.describe()!r}",
                             hint="a dynamic activation runs as Int8DynamicLinear")
        self.act_spec = act_spec
        self.register_buffer("weight_rowsum", torch.empty(out_features, dtype=torch.int32,
                                                          device=device))
        self.register_buffer("input_scale", torch.empty((), device=device))
        self.register_buffer("input_zero_point", torch.empty((), dtype=torch.int32,
                                                             device=device))

    @property
    def act_symmetric(self) -> bool:
        return self.act_spec.symmetric

    def _specs(self) -> dict:
        return {**super()._specs(), "act_spec": self.act_spec}

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None, act_scale: Tensor | float,
                   act_zero_point: Tensor | int, weight_spec: TensorSpec = W8,
                   act_spec: TensorSpec = A8_STATIC):
        q, scale = quantize_weight_int8(weight, weight_spec)
        return cls.from_spec(weight_spec, q, scale, bias, act_spec=act_spec,
                             act_scale=act_scale, act_zero_point=act_zero_point)

    @classmethod
    def from_spec(cls, weight_spec: TensorSpec, q: Tensor, scale: Tensor,
                  bias: Tensor | None = None, *, act_spec: TensorSpec = A8_STATIC,
                  act_scale: Tensor | float = 1.0, act_zero_point: Tensor | int = 0):
        """As ``_Int8Weight.from_spec``, with the activation's frozen scale / zero point."""
        m = super().from_spec(weight_spec, q, scale, bias, act_spec=act_spec)
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


class Int8WeightOnlyLinear(_Int8Weight):
    """int8 weights, float activations: the kernel table's ``w8`` entry
    (``compute_dtype="fp32"``: dequantize + float32 GEMM, see the module doc)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 weight_spec: TensorSpec = W8, compute_dtype: str = "bf16",
                 device=None) -> None:
        super().__init__(in_features, out_features, bias, weight_spec=weight_spec,
                         device=device)
        assert compute_dtype in ("bf16", "fp32"), compute_dtype
        self.compute_dtype = compute_dtype

    def _specs(self) -> dict:
        return {**super()._specs(), "compute_dtype": self.compute_dtype}

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None,
                   weight_spec: TensorSpec = W8):
        return cls.from_spec(weight_spec, *quantize_weight_int8(weight, weight_spec), bias)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)                 # [M, K]
        y = kernels.linear_w8(x2, self.weight, self.weight_scale, self.bias,
                              exact=self.compute_dtype == "fp32")
        return y.reshape(*x.shape[:-1], self.out_features)


class EmbeddingJson:
    """``to_json`` / ``from_json`` of the embedding modules (``Int8Embedding``, the packed
    ``PackedEmbedding``): the table's shapes and the weight spec, nothing else; their
    constructors take ``(num_embeddings, embedding_dim)`` and the keywords ``weight_spec``,
    ``device``."""

    def to_json(self) -> dict:
        return {"type": type(self).__name__, "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim, "weight": self.weight_spec.to_json()}

    config = to_json

    @classmethod
    def from_json(cls, config: dict):
        """The empty module (meta device) of a ``to_json()``."""
        return cls(config["num_embeddings"], config["embedding_dim"],
                   weight_spec=TensorSpec.from_json(config["weight"]), device="meta")


class Int8Embedding(EmbeddingJson, nn.Module):
    """int8 rows ``weight [num, dim]`` with one scale per row; only looked-up rows dequantized."""

    WEIGHT_BUFFERS = ("weight", "weight_scale")

    def __init__(self, num_embeddings: int, embedding_dim: int, *,
                 weight_spec: TensorSpec = W8, device=None) -> None:
        super().__init__()
        check_spec(weight_spec, (BITS,), W8_GRANULARITIES, "Int8Embedding weight")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight_spec = weight_spec
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim,
                                                   dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(num_embeddings, device=device))

    @classmethod
    def from_float(cls, weight: Tensor, weight_spec: TensorSpec = W8):
        return cls.from_spec(weight_spec, *quantize_weight_int8(weight, weight_spec))

    @classmethod
    def from_spec(cls, weight_spec: TensorSpec, q: Tensor, scale: Tensor):
        """int8 codes ``q [num, dim]`` and a per-row (``[num, 1]``, ``[num]``) or 0-d scale."""
        m = cls(*q.shape, weight_spec=weight_spec, device="meta")
        m.weight = q.to(torch.int8)
        m.weight_scale = scale.float().reshape(-1).expand(q.shape[0]).contiguous()
        return m

    def forward(self, ids: Tensor) -> Tensor:
        return kernels.embedding_int8(ids, self.weight, self.weight_scale)
