"""Pass: record activations at named nodes (Wei et al. 2023, Fig. 6b/6c).

requires: a named graph (``qdsl.graph.naming.name_graph``); the graph may already be
          quantized (``lower_fake``): then the recorder reads the activation
          quantizer's output, i.e. what the next op really consumes.
ensures:  each chosen node's output passes through an identity ``Recorder``; the
          graph computes exactly what it computed before.

    recs = insert_recorders(gm, named, ["block.0.res_sum", "block.1.res_sum"], keep=True)
    gm(input_ids=ids, cache_position=pos)
    recs["block.0.res_sum"].max_abs    # [max |x| of each call]
    recs["block.0.res_sum"].last       # the last call's output (keep=True)

``relative_error(q, f)`` = ||q - f|| / ||f|| (Frobenius), e.g. f = [3, 4], q = [3, 4.5]
-> 0.5 / 5 = 0.1.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from .common import ACT_PREFIX, attr_name, fx_node, set_activation_module

RECORD_PREFIX = "record."  # recorders live at attr qdsl_act__record_<name>
# roles whose outputs the sweep records per block: residual sums and the linears
RECORDED_ROLES = ("residual_add", "linear")


class Recorder(nn.Module):
    """Identity on its input; keeps max |x| per call and, with ``keep``, the last output."""

    def __init__(self, keep: bool = False):
        super().__init__()
        self.keep = keep
        self.max_abs: list[float] = []
        self.last: torch.Tensor | None = None

    def forward(self, x):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            self.max_abs.append(float(x.detach().abs().max()))
            if self.keep:
                self.last = x.detach().clone()
        return x

    def reset(self) -> None:
        self.max_abs, self.last = [], None


def _output_node(gm: fx.GraphModule, canonical: str, fx_name: str) -> str:
    """The fx node whose output the rest of the graph reads for ``canonical``: its
    activation quantizer if ``lower_fake`` put one there, else the node itself."""
    node = fx_node(gm, fx_name)
    quantizer = attr_name(canonical, ACT_PREFIX)
    for user in node.users:
        if user.op == "call_module" and user.target == quantizer:
            return user.name
    return fx_name


def recorded_names(named, roles: tuple[str, ...] = RECORDED_ROLES) -> list[str]:
    """Names of the in-block nodes with one of ``roles``, in graph order."""
    return [n.name for n in named.nodes if n.block is not None and n.role in roles and n.node]


def insert_recorders(gm: fx.GraphModule, named, names: list[str], *,
                     keep: bool = False) -> dict[str, Recorder]:
    """Put a ``Recorder`` after each named node (after its quantizer, if any)."""
    recs: dict[str, Recorder] = {}
    for name in names:
        node = named[name]
        rec = Recorder(keep)
        set_activation_module(gm, RECORD_PREFIX + name, _output_node(gm, name, node.node), rec)
        recs[name] = rec
    gm.graph.lint()
    gm.recompile()
    return recs


def relative_error(q: torch.Tensor, f: torch.Tensor) -> float:
    """||q - f|| / ||f||; 0.0 when both are zero."""
    q, f = q.double(), f.double()
    den = float(f.norm())
    num = float((q - f).norm())
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))
