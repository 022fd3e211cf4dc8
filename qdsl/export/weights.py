"""The tensors of a compiled model as an outside format sees them: per source
parameter (its transformers name), the float tensor qdsl computes with and, for a
quantized weight, qdsl's own integer codes, scales and zero points.

Read from a ``QuantizedModel`` loaded with ``--lower fake`` (``qdsl.load``): the
graph holds each quantized weight's fake-quantized copy (``qdsl_weight__<name>``,
exactly ``(codes - zero_point) * scale``), from which the codes are recovered and
checked to reproduce it bit for bit; every other parameter is the model's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config.spec import GroupWise, PerChannel, PerTensor, TensorSpec
from ..errors import ExportError
from ..graph.attrs import param
from ..passes.common import WEIGHT_PREFIX, attr_name
from ..quant.primitives import dequantize, group_unview, group_view, quantize
from ..runtime.conv1d import oriented


@dataclass
class Weight:
    """One parameter of the source model, under its transformers name."""

    name: str                      # "model.layers.0.self_attn.q_proj.weight"
    tensor: Tensor                 # float32, what qdsl computes with; matrices [out, in]
    node: str | None = None        # canonical node owning it (None: norms, biases, ...)
    spec: TensorSpec | None = None  # the plan's weight spec (None: not a planned weight)
    codes: Tensor | None = None    # int32 [out, in] (quantized specs only)
    scale: Tensor | None = None    # float32 [out, groups]: one per row and group of columns
    zero_point: Tensor | None = None  # int32 [out, groups]

    @property
    def quantized(self) -> bool:
        return self.codes is not None

    @property
    def group(self) -> int | None:
        """Columns sharing one scale (GroupWise size; a whole row for per-channel)."""
        if self.scale is None:
            return None
        return self.tensor.shape[1] // self.scale.shape[1]


def collect(q) -> dict[str, Weight]:
    """Every parameter of ``q`` (a fake-lowered ``QuantizedModel``) by transformers name,
    in graph order (named weights first, then the rest of the model's parameters)."""
    if q.lower != "fake":
        raise ExportError(f"the artifact was lowered to {q.lower!r}; export reads the "
                          "fake-quant form: compile the recipe without --lower int8 (the "
                          "codes and scales are the same) and export that artifact")
    gm, out, used = q.gm, {}, set()
    prefix = _wrapper_prefix(q.named)
    for node in q.named.nodes:
        if not node.has_weight:
            continue
        name = node.module + ".weight"
        spec = q.plan[node.name].weight
        used.add(node.weight)
        fake = attr_name(node.name, WEIGHT_PREFIX)
        if spec is not None and spec.quantized:
            out[name] = _quantized(q, node, name, spec, param(gm, fake))
        else:
            w = param(gm, fake) if hasattr(gm, fake) else param(gm, node.weight)
            out[name] = Weight(name, oriented(w.detach().float(), node.weight_layout),
                               node.name, spec)
        if node.bias is not None:
            used.add(node.bias)
            out[node.module + ".bias"] = Weight(node.module + ".bias",
                                                param(gm, node.bias).detach().float())
    for target, t in gm.named_parameters():
        if target.startswith(WEIGHT_PREFIX) or target in used:
            continue
        name = target[len(prefix):] if target.startswith(prefix) else target
        out.setdefault(name, Weight(name, t.detach().float()))
    return out


def _wrapper_prefix(named) -> str:
    """What capture put before the model's own parameter names (``model.``)."""
    for node in named.nodes:
        if node.has_weight and node.weight.endswith(node.module + ".weight"):
            return node.weight[:-len(node.module + ".weight")]
    return ""


def _quantized(q, node, name: str, spec: TensorSpec, fake: Tensor) -> Weight:
    w = oriented(fake.detach().float(), node.weight_layout)      # [out, in]
    if w.dim() != 2:
        raise ExportError(f"node {node.name}: a {w.dim()}-D quantized weight; only matrices "
                          "[out, in] export")
    scale, zp = q.frozen.weights[node.name]
    g = spec.granularity
    rows, cols = w.shape
    if isinstance(g, GroupWise):
        codes = group_unview(quantize(group_view(w, g.size), scale, zp, spec.bits, spec.symmetric))
        back = group_unview(dequantize(group_view(codes, g.size), scale, zp))
        groups = cols // g.size
    elif isinstance(g, (PerChannel, PerTensor)):
        codes = quantize(w, scale, zp, spec.bits, spec.symmetric)
        back = dequantize(codes, scale, zp)
        groups = 1
    else:
        raise ExportError(f"node {node.name}: weight granularity {g.name} does not export")
    if not torch.equal(back, w):
        raise ExportError(f"node {node.name}: its fake-quantized weight is not on its grid "
                          f"(max |diff| {float((back - w).abs().max()):.3g}); the artifact "
                          "does not hold what its plan says")
    return Weight(name, w, node.name, spec, codes, _per_group(scale.float(), rows, groups),
                  _per_group(zp.to(torch.int32), rows, groups))


def _per_group(p: Tensor, rows: int, groups: int) -> Tensor:
    """A weight quantizer's parameter (0-d, [out, 1] or [out, groups, 1]) as [out, groups]."""
    if p.numel() == rows * groups:
        return p.reshape(rows, groups).contiguous()
    return p.reshape(1, 1).expand(rows, groups).contiguous()
