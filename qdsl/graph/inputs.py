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
    norm_weight: str | None = None  # the producer is a norm: its scale's get_attr target
    norm_bias: str | None = None    # ... and its bias's (LayerNorm)


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
        out[name] = LinearInput(producer, via, readers, *_norm_params(x))
    return out


def _norm_params(x: fx.Node) -> tuple[str | None, str | None]:
    """(weight, bias) get_attr targets of a norm's output node: ``layer_norm(x, shape,
    w, b)``, or a decomposed RMSNorm's closing ``mul(w, x)``; (None, None) otherwise."""
    def attr(a) -> str | None:
        return a.target if isinstance(a, fx.Node) and a.op == "get_attr" else None
    name = aten_name(x)
    if name == "aten.layer_norm.default":
        return tuple(attr(x.args[i]) if len(x.args) > i else None for i in (2, 3))
    if name == "aten.mul.Tensor":
        w = [attr(a) for a in x.args if attr(a)]
        return (w[0] if len(w) == 1 else None), None
    return None, None


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


def fold_target(named, producer: str) -> tuple[str, str] | str:
    """Where a per-channel scale on ``producer``'s output can be folded (SmoothQuant):
    ``("norm", name)`` (a norm's weight, and bias), ``("linear", name)`` (a linear's
    output rows: the producer itself, or the ``up`` linear of a gated MLP's
    ``act(gate) * up``); else the reason it cannot, as a sentence."""
    node = named.by_name[producer]
    li = next((v for v in named.inputs.values() if v.producer == producer), None)
    if node.role == "norm" and li is not None and li.norm_weight is not None:
        return ("norm", producer)
    if node.role == "linear" and node.weight is not None:
        return ("linear", producer)
    if node.role == "gated_mul":
        up = producer.rsplit(".", 1)[0] + ".up"
        if up in named.by_name and named.by_name[up].weight is not None:
            return ("linear", up)
        return f"`{producer}` (gated_mul) has no `up` linear to fold the scale into"
    return (f"`{producer}` is a {node.role}" + (" without a scale" if node.role == "norm"
                                                  else "") + ": no per-channel weight to fold "
            "the scale into (SmoothQuant folds into a norm or a linear)")
