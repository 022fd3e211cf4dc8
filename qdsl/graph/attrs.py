"""A graph module's attributes: the tensor behind a ``get_attr`` target, the module
that owns a dotted target (to replace or delete it), and every tensor a graph reads."""

from __future__ import annotations

from typing import Any

import torch


def param(gm: torch.nn.Module, target: str) -> torch.Tensor:
    """The tensor behind a get_attr target (parameter, buffer or constant)."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    assert isinstance(obj, torch.Tensor), f"{target} is {type(obj).__name__}, not a tensor"
    return obj


def owner(gm: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    """``(module, name)`` of a dotted attribute target: ``"h.0.w"`` -> (``gm.h[0]``,
    ``"w"``); a top-level name is owned by ``gm``. The owner must exist."""
    path, _, name = target.rpartition(".")
    return (gm.get_submodule(path) if path else gm), name


def set_tensor(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Put ``value`` behind ``target`` (a parameter, frozen; a buffer; or a plain tensor
    attribute), replacing the old object rather than writing into it."""
    module, name = owner(gm, target)
    if name in module._parameters:
        module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    elif name in module._buffers:
        module._buffers[name] = value
    else:
        setattr(module, name, value)


def graph_tensors(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every tensor the graph reads: get_attr targets and the called modules' tensors."""
    out: dict[str, torch.Tensor] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            t = param(gm, n.target)
            out[n.target] = t
        elif n.op == "call_module":
            mod = gm.get_submodule(n.target)
            for k, t in list(mod.named_parameters()) + list(mod.named_buffers()):
                out[f"{n.target}.{k}"] = t
    return out
