"""How each named node runs under ``--lower int8``: the `exec` column of
``qdsl explain --lower int8``, decided by the same handlers as ``lower_int8`` (``HANDLERS``) without
rewriting the graph."""

from __future__ import annotations

import torch.fx as fx

from ..plan import QuantPlan
from .common import ACT_PREFIX
from .fuse_attention import find_attention
from .int8_handlers import FLOAT, FUSED, SIMULATED, _label, decide
from .lower_int8 import VIEW_OPS, _sites


def execution(gm: fx.GraphModule, named, plan: QuantPlan) -> dict[str, str]:
    """canonical name -> how it runs under ``--lower int8`` (the `exec` column).

    Weight nodes: the handler's label (``int8 gemm (dynamic)``, ``int8 weight-only``,
    ``packed w4``, ``int8 rows``) or ``simulated (fake-quant)`` where no handler applies,
    plus `` + fake-quant out`` when the node's own output is quantized. Other nodes:
    ``int8 (gemm input)`` when every reader of a quantized output is an int8 GEMM that
    quantizes it itself, ``simulated (fake-quant)`` when quantized otherwise,
    ``float`` (or ``float (fp16)``) when not quantized; ``float (fused attention)`` for the
    scores / probs / context of an attention ``fuse_attention`` will run as one SDPA call
    (neither scores nor probs quantized).
    """
    sites = _sites(gm, named, plan)
    fused = _fused_attention_nodes(gm, named, plan)
    out: dict[str, str] = {}
    gemm_inputs: dict[str, int] = {}
    consumed = set()
    by_name = {n.name: n for n in gm.graph.nodes}
    for s in sites:
        row = decide(s)
        out[s.name] = _label(row, s) if row else SIMULATED
        if row and row.feed_float and s.producer:
            gemm_inputs[s.producer] = gemm_inputs.get(s.producer, 0) + 1
            consumed.add(s.op.name)
    for node in named.nodes:
        a = plan[node.name].activation
        if a.quantized:
            real = node.name in gemm_inputs and _only_read_by(by_name.get(node.node), consumed)
            extra = "int8 (gemm input)" if real else SIMULATED
        elif node.node in fused:
            extra = FUSED
        else:
            extra = FLOAT if a.float_dtype == "fp32" else f"float ({a.float_dtype})"
        if node.name in out:
            if a.quantized:
                out[node.name] += " + fake-quant out"
        else:
            out[node.name] = extra
    return out


def _fused_attention_nodes(gm: fx.GraphModule, named, plan: QuantPlan) -> set[str]:
    """fx names of the attention chains lower_int8 will fuse: no quantized named node
    before the context matmul (whose own output quantizer sits after the fused call)."""
    by_fx = {n.node: n.name for n in named.nodes}
    out = set()
    for chain in find_attention(gm):
        inside = [by_fx[n.name] for n in chain.nodes[:-1] if n.name in by_fx]
        if not any(plan[name].activation.quantized for name in inside):
            out.update(n.name for n in chain.nodes)
    return out


def _only_read_by(start: fx.Node | None, ops: set[str]) -> bool:
    """Whether every reader of ``start`` (through views and quantizers) is one of ``ops``."""
    if start is None:
        return False
    stack, seen = list(start.users), set()
    while stack:
        u = stack.pop()
        if u in seen:
            continue
        seen.add(u)
        passthrough = (u.op == "call_module" and str(u.target).startswith(ACT_PREFIX)) or (
            u.op == "call_function" and str(u.target) in VIEW_OPS)
        if passthrough:
            stack.extend(u.users)
        elif u.name not in ops:
            return False
    return True


def weight_inputs(gm: fx.GraphModule, named, plan: QuantPlan) -> dict[str, tuple]:
    """canonical name of each node with a quantized weight -> ``(kind, producer,
    input spec, activation module target)``: what feeds its op (found the way
    ``lower_int8`` finds it; ``qdsl.export`` maps it to an input scheme)."""
    return {s.name: (s.kind, s.producer, s.input, s.act.target if s.act is not None else None)
            for s in _sites(gm, named, plan)}
