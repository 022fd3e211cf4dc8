"""Graph-editing helpers shared by the passes (fx GraphModules from torch.export)."""

from __future__ import annotations

import torch
from torch import fx, nn

from ..errors import GraphError
from ..graph.attrs import owner

ACT_PREFIX, WEIGHT_PREFIX = "qdsl_act__", "qdsl_weight__"


def attr_name(canonical: str, prefix: str = ACT_PREFIX) -> str:
    """``block.3.res_sum`` -> ``qdsl_act__block_3_res_sum`` (a valid attribute name)."""
    return prefix + canonical.replace(".", "_")


def fx_node(gm: fx.GraphModule, name: str) -> fx.Node:
    for n in gm.graph.nodes:
        if n.name == name:
            return n
    raise GraphError(f"graph has no node {name!r}", node=name,
                     hint="the plan was made for another capture of this model")


def set_activation_module(gm: fx.GraphModule, canonical: str, fx_name: str,
                          module: nn.Module) -> None:
    """Put ``module`` on the output of node ``fx_name``: every user of the node then
    reads ``module(node)``. Replaces the module if one is already there."""
    attr = attr_name(canonical)
    if hasattr(gm, attr):
        setattr(gm, attr, module)
        return
    gm.add_submodule(attr, module)
    node = fx_node(gm, fx_name)
    with gm.graph.inserting_after(node):
        q = gm.graph.call_module(attr, (node,))
    node.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
    q.meta = {k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack", "tensor_meta")}
    q.meta["qdsl"] = canonical


def weight_use(gm: fx.GraphModule, named_node) -> tuple[fx.Node, fx.Node]:
    """(op node, get_attr node) of ``named_node``'s weight: the op reading the weight on the
    path to the node's output (a tied weight has one get_attr and several users)."""
    out = fx_node(gm, named_node.node)
    # walk back from the output through at most a few nodes (views after a Conv1D addmm)
    frontier, seen = [out], set()
    for _ in range(6):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            for a in n.all_input_nodes:
                if a.op == "get_attr" and a.target == named_node.weight:
                    return n, a
                nxt.append(a)
        frontier = nxt
    raise GraphError(f"cannot find the op using weight {named_node.weight}", node=named_node.name)


def replace_weight(gm: fx.GraphModule, named_node, value: torch.Tensor) -> None:
    """Give ``named_node``'s op its own weight tensor ``value`` (a new attribute), leaving
    other users of a shared (tied) weight untouched; drops the old one if now unused."""
    op, old = weight_use(gm, named_node)
    attr = attr_name(named_node.name, WEIGHT_PREFIX)
    setattr(gm, attr, nn.Parameter(value.detach(), requires_grad=False))  # registers it
    if old.target != attr:
        with gm.graph.inserting_before(op):
            new = gm.graph.get_attr(attr)
        new.meta = dict(old.meta)
        op.replace_input_with(old, new)
        if not old.users:
            gm.graph.erase_node(old)
            _delete_attr(gm, old.target)


def _delete_attr(gm: fx.GraphModule, target: str) -> None:
    """Free a parameter no node reads any more (unless another attribute aliases it)."""
    module, name = owner(gm, target)
    if name in module._parameters:
        module._parameters[name] = None
    elif name in module._buffers:
        module._buffers[name] = None


def remove_inserted(gm: fx.GraphModule, prefix: str) -> None:
    """Take out every call_module whose target starts with ``prefix`` (statistics or
    recorders a pass inserted on a tensor), rewiring its users to its input."""
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and str(n.target).startswith(prefix):
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
            gm.delete_submodule(n.target)
    gm.graph.lint()
    gm.recompile()
