"""Runtime modules for simulated quantization (``--lower fake``).

Buffers and a one-line forward. Each module is built from the ``TensorSpec`` it runs
(``from_spec``) and holds it: ``to_json()`` is ``{"type": <class>, "spec":
spec.to_json()}``, the spec's own JSON and the one shape every runtime module
serialises its spec in (``qdsl.runtime.registry``); ``state_dict()`` holds the frozen
tensors (safetensors); ``registry.module_from_json(config, state)`` rebuilds any of them.

* ``FakeQuant``: static, frozen scale / zero point (and the PEG permutation, kept
  for the record: the d-long scale vector is already un-permuted, so the forward
  needs no permutation).
* ``DynamicFakeQuant``: range from the tensor itself at every call (min-max;
  per tensor, per token or per group); the spec's observer is not used.
* ``FloatCast``: fp16 / bf16 passthrough (cast to the dtype and back).
* ``quantize_weight`` / ``dequantize_weight``: weights are constant, so freeze computes
  their integer codes once; the lowerings reuse them (fake: dequantized to a float
  tensor, no per-forward work; int8: the runtime modules' codes).
* ``fake_quantize_weight``: the float weight's fake-quantized value in one call.

``FakeQuant`` and ``DynamicFakeQuant`` (per tensor, per token) run a float32 activation
without a gradient through qdsl's one-pass C++ kernel (``kernels.fake_quant`` /
``kernels.dynamic_fake_quant``, bit-identical to ``fake_quantize``: torch's per-tensor
kernel costs ~4 ns a value here, and a batch's per-token parameters took the multi-pass
reference maths); anything else, or no extension, runs the torch maths.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qdsl.quant.observers import make_observer
from qdsl.quant.primitives import (choose_qparams, dequantize, fake_quantize, group_unview,
                                   group_view, is_binary, quantize, reduce_mean_abs, reduce_range,
                                   round_scale_up)
from qdsl.quant.weights import dequantize_codes, rtn_codes
from qdsl.config.spec import GroupWise, PerGroup, PerTensor, PerToken, TensorSpec
from qdsl.runtime import kernels

FLOAT_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _SpecModule(nn.Module):
    """A runtime module holding the spec it runs: ``spec``, JSON ``{"type", "spec"}``."""

    spec: TensorSpec

    def to_json(self) -> dict:
        return {"type": type(self).__name__, "spec": self.spec.to_json()}

    def extra_repr(self) -> str:
        return self.spec.describe()


class FakeQuant(_SpecModule):
    """Static fake-quant of an activation: scale / zero_point broadcast against x.

    Per tensor: 0-d buffers; PEG: [d] vectors (+ ``perm`` [d] int64 for the record,
    present exactly when the spec says ``per_group(..., permute)``).
    """

    def __init__(self, spec: TensorSpec, scale: Tensor, zero_point: Tensor,
                 perm: Tensor | None = None) -> None:
        super().__init__()
        if not spec.quantized or spec.dynamic or isinstance(spec.granularity, PerToken):
            raise ValueError(f"FakeQuant runs a static quantized spec, got {spec.describe()!r}")
        g = spec.granularity
        if (perm is not None) != (isinstance(g, PerGroup) and g.permute):
            raise ValueError(f"FakeQuant {spec.describe()!r}: a PEG permutation is "
                             f"{'unexpected' if perm is not None else 'missing'}")
        self.spec = spec
        # the forward's two numbers, taken from the spec once (not re-read per call)
        self.bits, self.symmetric = spec.bits, spec.symmetric
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("zero_point", zero_point.detach().to(torch.int32).clone())
        perm = None if perm is None else perm.detach().to(torch.int64).clone()
        self.register_buffer("perm", perm)  # None: not PEG (absent from the state dict)

    @classmethod
    def from_spec(cls, spec: TensorSpec, scale: Tensor, zero_point: Tensor,
                  perm: Tensor | None = None) -> FakeQuant:
        """``spec`` with its frozen parameters (a calibrated observer's ``qparams()`` and
        ``perm``)."""
        return cls(spec, scale, zero_point, perm)

    def forward(self, x: Tensor) -> Tensor:
        y = kernels.fake_quant(x, self.scale, self.zero_point, self.bits, self.symmetric)
        if y is not None:   # qdsl's one-pass kernel, bit-identical
            return y
        return fake_quantize(x, self.scale, self.zero_point, self.bits, self.symmetric)

    @classmethod
    def from_state(cls, config: dict, state: dict[str, Tensor]) -> FakeQuant:
        return cls(TensorSpec.from_json(config["spec"]), state["scale"], state["zero_point"],
                   state.get("perm"))

    def extra_repr(self) -> str:
        return f"{self.spec.describe()}, scale={list(self.scale.shape)}"


class DynamicFakeQuant(_SpecModule):
    """Min-max range of the current tensor (per tensor, per token [..., 1], per group [d]).

    1-bit symmetric: scale = mean|x| per group. No state besides the spec.
    """

    def __init__(self, spec: TensorSpec) -> None:
        super().__init__()
        if not spec.quantized:
            raise ValueError(f"spec {spec.describe()!r} is float: use FloatCast")
        self.spec = spec
        self.binary = is_binary(spec.bits, spec.symmetric)

    @classmethod
    def from_spec(cls, spec: TensorSpec) -> DynamicFakeQuant:
        return cls(spec)

    def forward(self, x: Tensor) -> Tensor:
        s = self.spec
        if isinstance(s.granularity, (PerTensor, PerToken)):   # range and pass in one kernel
            y = kernels.dynamic_fake_quant(x, isinstance(s.granularity, PerToken), s.bits,
                                           s.symmetric)
            if y is not None:
                return y
        with torch.no_grad():
            xf = x.detach().float()
            if self.binary:
                scale = reduce_mean_abs(xf, s.granularity, s.kind).clamp_min(1e-8)
                zero_point = torch.zeros_like(scale, dtype=torch.int32)
            else:
                scale, zero_point = choose_qparams(*reduce_range(xf, s.granularity, s.kind),
                                                   s.bits, s.symmetric)
        return fake_quantize(x, scale, zero_point, s.bits, s.symmetric)

    @classmethod
    def from_state(cls, config: dict, state: dict[str, Tensor] | None = None) -> DynamicFakeQuant:
        return cls(TensorSpec.from_json(config["spec"]))


class FloatCast(_SpecModule):
    """fp16 / bf16 passthrough of a float spec: x.to(dtype).to(x.dtype) (rounds the
    mantissa / range)."""

    def __init__(self, spec: TensorSpec) -> None:
        super().__init__()
        if spec.quantized or spec.float_dtype == "fp32":
            raise ValueError(f"FloatCast runs an fp16 / bf16 spec, got {spec.describe()!r}")
        self.spec = spec
        self.dtype = FLOAT_TORCH_DTYPES[spec.float_dtype]

    @classmethod
    def from_spec(cls, spec: TensorSpec) -> FloatCast:
        return cls(spec)

    @property
    def float_dtype(self) -> str:
        return self.spec.float_dtype

    def forward(self, x: Tensor) -> Tensor:
        return x.to(self.dtype).to(x.dtype)

    @classmethod
    def from_state(cls, config: dict, state: dict[str, Tensor] | None = None) -> FloatCast:
        return cls(TensorSpec.from_json(config["spec"]))


MODULE_TYPES: dict[str, type] = {c.__name__: c for c in (FakeQuant, DynamicFakeQuant, FloatCast)}


def activation_module(spec: TensorSpec, observer=None) -> nn.Module | None:
    """The module an activation spec runs as after freezing (None: fp32, nothing to do):
    FloatCast, DynamicFakeQuant, or FakeQuant frozen from its calibrated ``observer``."""
    if not spec.quantized:
        return None if spec.float_dtype == "fp32" else FloatCast.from_spec(spec)
    if spec.dynamic:
        return DynamicFakeQuant.from_spec(spec)
    assert observer is not None, f"no observer for static spec {spec.describe()}"
    return FakeQuant.from_spec(spec, *observer.qparams(), observer.perm)


def quantize_weight(w: Tensor, spec: TensorSpec, scale_dtype: torch.dtype | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Integer codes of a constant, quantized-spec weight [out, in], computed once:
    ``(q, scale, zero_point)``. ``scale_dtype`` (fp16 under ``set export = gguf``):
    the observer's scales are first rounded up to values that dtype holds exactly.

    q: int32 [out, in] on the spec's grid, rounded to nearest; scale / zero_point are the
    observer's (per channel [out, 1], group [out, in/size, 1], ...).
    ``dequantize_weight(q, spec, scale, zero_point)`` is the fake-quantized weight.
    Requires ``spec.quantized``. (``qdsl.quant.weights.rtn_codes``.)
    """
    return rtn_codes(w, spec, scale_dtype)


def dequantize_weight(q: Tensor, spec: TensorSpec, scale: Tensor,
                      zero_point: Tensor) -> Tensor:
    """float32 [out, in] weight of codes ``q [out, in]`` (from ``quantize_weight``, or GPTQ /
    AWQ codes on the same grid): for round-to-nearest codes, the same values as
    fake-quantizing the float weight with these parameters."""
    return dequantize_codes(q, spec, scale, zero_point)


def fake_quantize_weight(w: Tensor, spec: TensorSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Fake-quantize a constant weight [out, in] once: ``(w_hat, scale, zero_point)``.

    w_hat has w's shape and dtype and no grad; scale / zero_point are the observer's
    (per channel [out, 1], group [out, in/size, 1], ...). A transformers Conv1D weight is
    [in, out]: pass ``w.t()`` and transpose w_hat back. Float specs cast (fp16/bf16).
    """
    with torch.no_grad():
        if not spec.quantized:
            w_hat = w.to(FLOAT_TORCH_DTYPES[spec.float_dtype]).to(w.dtype)
            return w_hat, torch.ones(()), torch.zeros((), dtype=torch.int32)
        obs = make_observer(spec)
        obs(w)
        scale, zero_point = obs.qparams()
        wf = w.detach().float()
        if isinstance(spec.granularity, GroupWise):
            v = group_view(wf, spec.granularity.size)
            w_hat = group_unview(fake_quantize(v, scale, zero_point, spec.bits, spec.symmetric))
        else:
            w_hat = fake_quantize(wf, scale, zero_point, spec.bits, spec.symmetric)
    return w_hat.to(w.dtype), scale, zero_point
