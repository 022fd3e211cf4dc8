"""Pass: check that a plan's granularities fit the tensors they apply to, before
any data is read (so `qdsl explain` reports it too).

requires: ``gm`` is the graph ``named`` was computed on (fx nodes carry ``meta["val"]``).
ensures:  raises GraphError naming the node when group-wise weights do not divide the
          input dimension, or per-embedding-group activations do not divide the
          hidden dimension, or GPTQ / AWQ is asked of a weight no linear reads (an
          embedding), or AWQ of a linear whose input is quantized; the graph is unchanged.
"""

from __future__ import annotations

from torch import fx

from ..errors import GraphError
from ..graph.attrs import param
from ..plan import QuantPlan
from ..config.rounding import AWQ
from ..config.spec import GroupWise, PerGroup
from .common import fx_node
from .round_weights import check_awq_input, linear_input


def validate_plan(gm: fx.GraphModule, named, plan: QuantPlan) -> None:
    for node in named.nodes:
        entry = plan[node.name]
        w, a = entry.weight, entry.activation
        if w is not None and w.quantized and isinstance(w.granularity, GroupWise):
            shape = tuple(param(gm, node.weight).shape)
            cols = shape[0] if node.weight_layout == "in_out" else shape[-1]
            if cols % w.granularity.size:
                divisors = [g for g in (32, 64, 128, 256) if cols % g == 0]
                raise GraphError(
                    f"group(size={w.granularity.size}) does not divide the {cols} input "
                    f"columns of {node.name}'s weight {list(shape)}", node=node.name,
                    hint=f"use a group size dividing {cols}"
                    + (f" (e.g. {', '.join(map(str, divisors))})" if divisors else "")
                    + ", or per_channel")
        if w is not None and w.quantized and w.rounding is not None:
            # GraphError naming the node and the rule if no linear reads the weight
            rule = entry.decided_by.get("weight", {}).get("rounding", "")
            linear_input(gm, node, rule)
            if isinstance(w.rounding, AWQ):
                check_awq_input(gm, named, plan, node, rule)
        if a.quantized and isinstance(a.granularity, PerGroup):
            val = fx_node(gm, node.node).meta.get("val")
            d = val.shape[-1] if val is not None and hasattr(val, "shape") else None
            if d is not None and int(d) % a.granularity.k:
                raise GraphError(
                    f"per_group(K={a.granularity.k}) does not divide the hidden size {int(d)} "
                    f"of {node.name}'s output", node=node.name,
                    hint=f"choose K dividing {int(d)}")
