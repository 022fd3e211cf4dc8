"""Runtime modules for simulated quantization (``--lower fake``).

Buffers and a one-line forward. Every module saves as ``state_dict()`` tensors
(safetensors) plus ``to_json()`` (config); ``module_from_json(config, state)``
rebuilds any of them.

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
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qdsl.quant.observers import Observer, make_observer
from qdsl.quant.primitives import (choose_qparams, dequantize, fake_quantize, group_unview,
                                   group_view, is_binary, quantize, reduce_mean_abs, reduce_range)
from qdsl.quant.weights import dequantize_codes, rtn_codes
from qdsl.config.spec import GroupWise, TensorSpec

FLOAT_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class FakeQuant(nn.Module):
    """Static fake-quant of an activation: scale / zero_point broadcast against x.

    Per tensor: 0-d buffers; PEG: [d] vectors (+ ``perm`` [d] int64 for the record).
    """

    def __init__(self, scale: Tensor, zero_point: Tensor, bits: int, symmetric: bool,
                 perm: Tensor | None = None) -> None:
        super().__init__()
        self.bits, self.symmetric = int(bits), bool(symmetric)
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("zero_point", zero_point.detach().to(torch.int32).clone())
        perm = None if perm is None else perm.detach().to(torch.int64).clone()
        self.register_buffer("perm", perm)  # None: not PEG (absent from the state dict)

    def forward(self, x: Tensor) -> Tensor:
        return fake_quantize(x, self.scale, self.zero_point, self.bits, self.symmetric)

    def to_json(self) -> dict:
        return {"type": "FakeQuant", "bits": self.bits, "symmetric": self.symmetric}

    @classmethod
    def from_state(cls, config: dict, state: dict[str, Tensor]) -> FakeQuant:
        return cls(state["scale"], state["zero_point"], config["bits"], config["symmetric"],
                   state.get("perm"))

    @classmethod
    def from_observer(cls, obs: Observer) -> FakeQuant:
        """Freeze a calibrated observer."""
        scale, zero_point = obs.qparams()
        return cls(scale, zero_point, obs.bits, obs.symmetric, obs.perm)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, symmetric={self.symmetric}, "
                f"scale={list(self.scale.shape)}, perm={self.perm is not None}")


class DynamicFakeQuant(nn.Module):
    """Min-max range of the current tensor (per tensor, per token [..., 1], per group [d]).

    1-bit symmetric: scale = mean|x| per group. No state besides the spec.
    """

    def __init__(self, spec: TensorSpec) -> None:
        super().__init__()
        if not spec.quantized:
            raise ValueError(f"spec {spec.describe()!r} is float: use FloatCast")
        if spec.kind not in spec.granularity.kinds:
            raise ValueError(f"{spec.granularity.name} does not apply to {spec.kind}s")
        self.spec = spec

    def forward(self, x: Tensor) -> Tensor:
        s = self.spec
        with torch.no_grad():
            xf = x.detach().float()
            if is_binary(s.bits, s.symmetric):
                scale = reduce_mean_abs(xf, s.granularity, s.kind).clamp_min(1e-8)
                zero_point = torch.zeros_like(scale, dtype=torch.int32)
            else:
                scale, zero_point = choose_qparams(*reduce_range(xf, s.granularity, s.kind),
                                                   s.bits, s.symmetric)
        return fake_quantize(x, scale, zero_point, s.bits, s.symmetric)

    def to_json(self) -> dict:
        return {"type": "DynamicFakeQuant", "spec": self.spec.to_json()}

    @classmethod
    def from_state(cls, config: dict, state: dict[str, Tensor] | None = None) -> DynamicFakeQuant:
        return cls(TensorSpec.from_json(config["spec"]))

    def extra_repr(self) -> str:
        return self.spec.describe()


class FloatCast(nn.Module):
    """fp16 / bf16 passthrough: x.to(dtype).to(x.dtype) (rounds the mantissa / range)."""

    def __init__(self, float_dtype: str) -> None:
        super().__init__()
        if float_dtype not in FLOAT_TORCH_DTYPES:
            raise ValueError(f"float dtype must be one of {list(FLOAT_TORCH_DTYPES)}, "
                             f"got {float_dtype!r}")
        self.float_dtype = float_dtype

    def forward(self, x: Tensor) -> Tensor:
        return x.to(FLOAT_TORCH_DTYPES[self.float_dtype]).to(x.dtype)

    def to_json(self) -> dict:
        return {"type": "FloatCast", "float_dtype": self.float_dtype}

    @classmethod
    def from_state(cls, config: dict, state: dict[str, Tensor] | None = None) -> FloatCast:
        return cls(config["float_dtype"])

    def extra_repr(self) -> str:
        return self.float_dtype


MODULE_TYPES: dict[str, type] = {c.__name__: c for c in (FakeQuant, DynamicFakeQuant, FloatCast)}


def module_from_json(config: dict, state: dict[str, Tensor] | None = None) -> nn.Module:
    """Rebuild any runtime module from its ``to_json()`` and ``state_dict()``."""
    return MODULE_TYPES[config["type"]].from_state(config, state or {})


def quantize_weight(w: Tensor, spec: TensorSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Integer codes of a constant, quantized-spec weight [out, in], computed once:
    ``(q, scale, zero_point)``.

    q: int32 [out, in] on the spec's grid, rounded to nearest; scale / zero_point are the
    observer's (per channel [out, 1], group [out, in/size, 1], ...).
    ``dequantize_weight(q, spec, scale, zero_point)`` is the fake-quantized weight.
    Requires ``spec.quantized``. (``qdsl.quant.weights.rtn_codes``.)
    """
    return rtn_codes(w, spec)


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
