"""Pass: turn calibrated observers and the plan's weight specs into frozen
quantization parameters (what an artifact stores).

requires: ``calibrate`` ran (static activation observers have data).
ensures:  ``Frozen`` holds, per named node, its activation module (FakeQuant with
          frozen scale / zero point / PEG permutation, DynamicFakeQuant, or FloatCast)
          and its weight's (scale, zero_point) and integer codes (computed once here;
          the lowerings reuse them); the graph is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn

from ..graph.attrs import param
from ..runtime.conv1d import oriented
from ..runtime.fakequant import activation_module, quantize_weight
from ..runtime.registry import module_from_json
from ..quant.observers import Observer
from ..plan import QuantPlan


@dataclass
class Frozen:
    """Frozen quantization parameters, keyed by canonical name.

    ``codes``: each quantized weight's int32 codes [out, in] (``quantize_weight``), as
    ``freeze`` computed them; in memory only (an artifact stores the lowered weights,
    not these): ``from_state`` leaves it empty, and the lowerings then derive the
    codes from the stored weight and (scale, zero_point)."""

    activations: dict[str, nn.Module] = field(default_factory=dict)
    weights: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # (scale, zero_point)
    codes: dict[str, Tensor] = field(default_factory=dict)
    smooth: dict[str, Tensor] = field(default_factory=dict)  # producer -> SmoothQuant scales

    def to_state(self) -> tuple[dict, dict[str, Tensor]]:
        """(JSON config, flat tensors for safetensors: ``act.<name>.<buffer>``, ``weight.<name>.scale``)."""
        config = {"activations": {k: m.to_json() for k, m in self.activations.items()},
                  "weights": sorted(self.weights)}
        tensors: dict[str, Tensor] = {}
        for k, m in self.activations.items():
            for b, t in m.state_dict().items():
                tensors[f"act.{k}.{b}"] = t.contiguous()
        for k, (scale, zero_point) in self.weights.items():
            tensors[f"weight.{k}.scale"] = scale.contiguous()
            tensors[f"weight.{k}.zero_point"] = zero_point.contiguous()
        if self.smooth:  # only when used: artifacts without transforms keep their form
            config["smooth"] = sorted(self.smooth)
            tensors.update({f"smooth.{k}.scale": s.contiguous() for k, s in self.smooth.items()})
        return config, tensors

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, Tensor]) -> Frozen:
        """Inverse of ``to_state``; ValueError naming the tensor or config entry that
        is missing or malformed (the artifact loader reports it as damage)."""
        acts = {}
        for k, c in config["activations"].items():
            prefix = f"act.{k}."
            try:
                acts[k] = module_from_json(c, {n[len(prefix):]: t for n, t in tensors.items()
                                               if n.startswith(prefix)})
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"activation quantizer {k}: missing or malformed {e}") from None
        weights = {}
        for k in config["weights"]:
            scale, zero_point = tensors.get(f"weight.{k}.scale"), tensors.get(f"weight.{k}.zero_point")
            if scale is None or zero_point is None:
                raise ValueError(f"weight quantizer {k}: tensor weight.{k}.scale or "
                                 ".zero_point is missing")
            weights[k] = (scale, zero_point)
        smooth = {k: tensors.get(f"smooth.{k}.scale") for k in config.get("smooth", ())}
        if any(s is None for s in smooth.values()):
            raise ValueError("a smooth scale tensor smooth.<node>.scale is missing")
        return cls(acts, weights, smooth=smooth)


@torch.no_grad()
def freeze(gm: fx.GraphModule, named, plan: QuantPlan,
           observers: dict[str, Observer], *, export: str | None = None) -> Frozen:
    """``export == "gguf"`` (``set export = gguf``): weight scales rounded up to fp16,
    so that GGUF's fp16 block scales carry them exactly (docs/export.md)."""
    scale_dtype = torch.float16 if export == "gguf" else None
    frozen = Frozen()
    for node in named.nodes:
        entry = plan[node.name]
        m = activation_module(entry.activation, observers.get(node.name))
        if m is not None:
            frozen.activations[node.name] = m
        if entry.weight is not None and entry.weight.quantized:
            w = oriented(param(gm, node.weight), node.weight_layout)
            q, scale, zero_point = quantize_weight(w, entry.weight, scale_dtype)
            frozen.weights[node.name] = (scale, zero_point)
            frozen.codes[node.name] = q
    return frozen
