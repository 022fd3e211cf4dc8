"""Pass: turn calibrated observers and the plan's weight specs into frozen
quantization parameters (what an artifact stores).

requires: ``calibrate`` ran (static activation observers have data).
ensures:  ``Frozen`` holds, per named node, its activation module (FakeQuant with
          frozen scale / zero point / PEG permutation, DynamicFakeQuant, or FloatCast)
          and its weight's (scale, zero_point) and integer codes (computed once here,
          or GPTQ's / AWQ's from ``round_weights``; the lowerings reuse them); the
          graph is unchanged.
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
from ..quant.primitives import round_scale_up
from ..quant.weights import weight_params
from ..plan import QuantPlan


@dataclass
class Frozen:
    """Frozen quantization parameters, keyed by canonical name.

    ``codes``: each quantized weight's int32 codes [out, in] (``quantize_weight``), as
    ``freeze`` computed them; in memory only (an artifact stores the lowered weights,
    not these): ``from_state`` leaves it empty, and the lowerings then derive the
    codes from the stored weight and (scale, zero_point). Except ``kept``: codes
    chosen by GPTQ / AWQ, which the source weight does not give back; they are
    stored (``weight.<name>.codes``, int8 or int16) and restored. ``in_scales``: AWQ's
    per-input-channel scale s of a linear (it reads ``x / s``), stored as
    ``weight.<name>.in_scale``."""

    activations: dict[str, nn.Module] = field(default_factory=dict)
    weights: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # (scale, zero_point)
    codes: dict[str, Tensor] = field(default_factory=dict)
    smooth: dict[str, Tensor] = field(default_factory=dict)  # producer -> SmoothQuant scales
    kept: set[str] = field(default_factory=set)
    in_scales: dict[str, Tensor] = field(default_factory=dict)

    def drop_codes(self) -> None:
        """Free the codes the lowerings used, keeping those an artifact must store."""
        self.codes = {k: v for k, v in self.codes.items() if k in self.kept}

    def to_state(self) -> tuple[dict, dict[str, Tensor]]:
        """(JSON config, flat tensors for safetensors: ``act.<name>.<buffer>``, ``weight.<name>.scale``)."""
        config = {"activations": {k: m.to_json() for k, m in self.activations.items()},
                  "weights": sorted(self.weights)}
        if self.kept or self.in_scales:  # absent otherwise: older artifacts read as before
            config["codes"], config["in_scales"] = sorted(self.kept), sorted(self.in_scales)
        tensors: dict[str, Tensor] = {}
        for k, m in self.activations.items():
            for b, t in m.state_dict().items():
                tensors[f"act.{k}.{b}"] = t.contiguous()
        for k, (scale, zero_point) in self.weights.items():
            tensors[f"weight.{k}.scale"] = scale.contiguous()
            tensors[f"weight.{k}.zero_point"] = zero_point.contiguous()
        for k in self.kept:
            tensors[f"weight.{k}.codes"] = stored_codes(self.codes[k])
        for k, s in self.in_scales.items():
            tensors[f"weight.{k}.in_scale"] = s.float().contiguous()
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
        codes, in_scales = {}, {}
        for k in config.get("codes", []):
            t = tensors.get(f"weight.{k}.codes")
            if t is None or k not in weights:
                raise ValueError(f"weight quantizer {k}: tensor weight.{k}.codes is missing")
            codes[k] = t.to(torch.int32)
        for k in config.get("in_scales", []):
            t = tensors.get(f"weight.{k}.in_scale")
            if t is None or k not in weights:
                raise ValueError(f"weight quantizer {k}: tensor weight.{k}.in_scale is missing")
            in_scales[k] = t
        return cls(acts, weights, codes, smooth=smooth, kept=set(codes), in_scales=in_scales)


def stored_codes(q: Tensor) -> Tensor:
    """Kept codes as an artifact stores them: int8 when they fit, else int16."""
    small = q.numel() == 0 or (int(q.min()) >= -128 and int(q.max()) <= 127)
    return q.to(torch.int8 if small else torch.int16).contiguous()


@torch.no_grad()
def freeze(gm: fx.GraphModule, named, plan: QuantPlan,
           observers: dict[str, Observer], rounded: dict | None = None, *,
           export: str | None = None, codes: bool = True) -> Frozen:
    """``rounded``: ``round_weights``' GPTQ / AWQ results, stored instead of rounding
    those weights to nearest. ``export == "gguf"`` (``set export = gguf``): weight
    scales rounded up to fp16, so that GGUF's fp16 block scales carry them exactly
    (docs/export.md; GPTQ / AWQ scales are not rounded: the export reports them).
    ``codes=False`` (the streamed compile of a fake artifact, which stores scales):
    weights get their (scale, zero_point) only, not a codes tensor as large again."""
    scale_dtype = torch.float16 if export == "gguf" else None
    frozen, rounded = Frozen(), rounded or {}
    for node in named.nodes:
        entry = plan[node.name]
        m = activation_module(entry.activation, observers.get(node.name))
        if m is not None:
            frozen.activations[node.name] = m
        if node.name in rounded:
            r = rounded[node.name]
            frozen.weights[node.name] = (r.scale, r.zero_point)
            frozen.codes[node.name] = r.codes
            frozen.kept.add(node.name)
            if r.in_scale is not None:
                frozen.in_scales[node.name] = r.in_scale
        elif entry.weight is not None and entry.weight.quantized:
            w = oriented(param(gm, node.weight), node.weight_layout)
            if not codes:   # the same (scale, zero_point) as quantize_weight's, no codes
                scale, zero_point = weight_params(w.detach().float(), entry.weight)
                if scale_dtype is not None:
                    scale = round_scale_up(scale, scale_dtype)
                frozen.weights[node.name] = (scale, zero_point)
                continue
            q, scale, zero_point = quantize_weight(w, entry.weight, scale_dtype)
            frozen.weights[node.name] = (scale, zero_point)
            frozen.codes[node.name] = q
    return frozen
