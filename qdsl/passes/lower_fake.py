"""Pass: lower frozen parameters to a fake-quant (simulation) graph.

requires: ``frozen`` from ``freeze`` (or loaded from an artifact) for this plan.
ensures:  each activation module sits on its node's output (replacing an observer
          if one is there); each quantized weight is replaced, for its own op only,
          by its fake-quantized value, computed once here (weights are constant):
          the dequantized codes ``freeze`` computed (``frozen.codes``), or, for a
          frozen state without codes (an artifact's), the stored weight
          fake-quantized with the frozen (scale, zero_point). Both give the same
          floats: ``fake_quantize`` is ``dequantize(quantize(.))``.
          An AWQ weight's linear reads its input through ``InputScale(1/s)``
          (``qdsl_inscale__<name>``, that op only; ``frozen.in_scales``).
          Export's no-op nodes stay: the pipelines (``qdsl.passes.pipeline.FAKE``)
          run ``simplify.drop_noops`` next.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx

from ..graph.attrs import param
from ..runtime.conv1d import oriented
from ..runtime.fakequant import FLOAT_TORCH_DTYPES, dequantize_weight
from ..plan import QuantPlan
from ..quant.primitives import fake_quantize, group_unview, group_view
from ..config.spec import GroupWise, TensorSpec
from ..graph.ops import WEIGHTED_ATEN_OPS
from ..runtime.inputs import InputScale
from .common import attr_name, replace_weight, set_activation_module, weight_use
from .freeze import Frozen

INSCALE_PREFIX = "qdsl_inscale__"


def fake_weight(w: Tensor, spec: TensorSpec, scale: Tensor, zero_point: Tensor) -> Tensor:
    """Fake-quantize w [out, in] with stored parameters (no range search)."""
    if not spec.quantized:
        return w.to(FLOAT_TORCH_DTYPES[spec.float_dtype]).to(w.dtype)
    wf = w.float()
    if isinstance(spec.granularity, GroupWise):
        v = group_view(wf, spec.granularity.size)  # [out, in/size, size]
        return group_unview(fake_quantize(v, scale, zero_point, spec.bits, spec.symmetric)).to(w.dtype)
    return fake_quantize(wf, scale, zero_point, spec.bits, spec.symmetric).to(w.dtype)


@torch.no_grad()
def lower_fake(gm: fx.GraphModule, named, plan: QuantPlan, frozen: Frozen) -> fx.GraphModule:
    for node in named.nodes:
        if node.name in frozen.activations:
            set_activation_module(gm, node.name, node.node, frozen.activations[node.name])
        spec = plan[node.name].weight
        if spec is None:
            continue
        if node.name in frozen.weights:
            w = oriented(param(gm, node.weight), node.weight_layout)
            q = frozen.codes.get(node.name)
            w_hat = (fake_weight(w, spec, *frozen.weights[node.name]) if q is None
                     else dequantize_weight(q, spec, *frozen.weights[node.name]).to(w.dtype))
            w_hat = oriented(w_hat, node.weight_layout)
            if node.name in frozen.in_scales:  # before the weight gets its new attribute
                _scale_input(gm, node, frozen.in_scales[node.name])
            replace_weight(gm, node, w_hat.contiguous())
        elif not spec.quantized and spec.float_dtype != "fp32":
            replace_weight(gm, node, fake_weight(param(gm, node.weight), spec, None, None))
    gm.graph.lint()
    gm.recompile()
    return gm


def _scale_input(gm: fx.GraphModule, node, s: Tensor) -> None:
    """Make ``node``'s linear read ``x * (1/s)`` (AWQ), through an ``InputScale``."""
    op, _ = weight_use(gm, node)
    i = WEIGHTED_ATEN_OPS[str(op.target)][0]
    attr = attr_name(node.name, INSCALE_PREFIX)
    gm.add_submodule(attr, InputScale(1.0 / s.float()))
    with gm.graph.inserting_before(op):
        new = gm.graph.call_module(attr, (op.args[i],))
    new.meta = {k: v for k, v in op.args[i].meta.items() if k in ("val", "tensor_meta")}
    op.update_arg(i, new)
