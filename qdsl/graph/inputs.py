"""What each linear reads: the named node whose output is a linear's input.

A recipe's ``.input`` port (docs/language.md, "Linear inputs") sets the activation
a linear reads. qdsl quantizes activations at named nodes' outputs, so the input of
a linear is the output of its *producer*: the named node reached by walking back
from the linear op's input argument through the view ops ``LINEAR_INPUT_VIEWS``,
the same walk ``passes.lower_int8`` makes to find the quantizer it absorbs into an
integer GEMM. One tensor may feed several readers (``ln_1`` feeds q, k and v);
``readers`` lists them, so the planner can refuse a rule that would quantize a
shared tensor for only some of its linears.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from qdsl.graph.named import NamedNode
from qdsl.graph.ops import LINEAR_INPUT_VIEWS, WEIGHTED_ATEN_OPS, aten_name


@dataclass(frozen=True)
class LinearInput:
    """The input of one linear: ``producer`` (canonical name; None when the walk back
    reaches no named node), ``via`` (the fx node the walk stopped at and its op, for
    messages) and ``readers``: every other reader of the producer's output, as
    canonical names of linears, or ``"op NAME (fx node N)"`` for other ops."""

    producer: str | None
    via: str
    readers: tuple[str, ...] = ()


def weight_op(gm: fx.GraphModule, node: NamedNode) -> fx.Node | None:
    """The weighted aten op reading ``node``'s weight on the way to its output."""
    by_name = {n.name: n for n in gm.graph.nodes}
    frontier, seen = [by_name.get(node.node)], set()
    for _ in range(6):
        nxt = []
        for n in frontier:
            if n is None or n in seen:
                continue
            seen.add(n)
            row = WEIGHTED_ATEN_OPS.get(aten_name(n))
            if row is not None and len(n.args) > row[1] and isinstance(n.args[row[1]], fx.Node) \
                    and n.args[row[1]].op == "get_attr" and n.args[row[1]].target == node.weight:
                return n
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return None


def linear_inputs(gm: fx.GraphModule, nodes: tuple[NamedNode, ...]) -> dict[str, LinearInput]:
    """``{linear's canonical name: LinearInput}`` for every named linear (embeddings
    read token ids and have none)."""
    outputs = {n.node: n.name for n in nodes}
    ops: dict[str, fx.Node] = {}
    for n in nodes:
        if n.role == "linear" and n.weight is not None:
            op = weight_op(gm, n)
            if op is not None:
                ops[n.name] = op
    linear_of = {op: name for name, op in ops.items()}
    found: dict[str, tuple[str | None, fx.Node]] = {}
    for name, op in ops.items():
        x = op.args[WEIGHTED_ATEN_OPS[aten_name(op)][0]]
        while isinstance(x, fx.Node) and x.name not in outputs \
                and x.op == "call_function" and aten_name(x) in LINEAR_INPUT_VIEWS:
            x = x.args[0]
        if isinstance(x, fx.Node):
            found[name] = (outputs.get(x.name), x)
    out = {}
    for name, (producer, x) in found.items():
        via = f"{x.name} ({aten_name(x) if x.op == 'call_function' else x.op})"
        readers = () if producer is None else tuple(
            r for r in _readers(x, linear_of) if r != name)
        out[name] = LinearInput(producer, via, readers)
    return out


def _readers(x: fx.Node, linear_of: dict[fx.Node, str]) -> list[str]:
    """Who reads ``x``'s value: linears by canonical name, other ops described."""
    out, stack, seen = [], [x], set()
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if u in linear_of:
                out.append(linear_of[u])
            elif u.op == "call_function" and aten_name(u) in LINEAR_INPUT_VIEWS:
                stack.append(u)
            elif u.op != "output":
                out.append(f"op {aten_name(u) if u.op == 'call_function' else u.op} "
                           f"(fx node {u.name})")
            else:
                out.append("the graph output")
    return sorted(set(out))
