"""Structural facts about a captured fx graph, the ground ``naming`` builds on.

Everything here reads graph structure (a networkx DiGraph over the fx nodes plus
each node's ``nn_module_stack``), never one family's module names:

* units: weighted ops (linear / addmm / embedding with a ``get_attr`` weight) and
  norms (``layer_norm`` ops, or a module scope computing ``rsqrt(mean(..))``),
  each with the node whose output is its activation;
* attention patterns: ``matmul -> (scale/mask ops) -> softmax -> (dropout) -> matmul``;
* blocks: the repeated module (a ModuleList element) holding exactly one attention.

The op tables it matches (``WEIGHTED_OPS``, ``NORM_OPS`` ...) live in ``ops``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch.fx import Node

from .ops import (FUSED_ATTENTION_PREFIX, MATMUL_OPS, NONLINEAR_OPS, NORM_OPS, PASSTHROUGH_OPS, SCORE_OPS, SOFTMAX_OPS,
                  WEIGHTED_OPS, opname)


def is_tensor(node: object) -> bool:
    return isinstance(node, Node) and isinstance(node.meta.get("val"), torch.Tensor)


def shape_key(node: Node) -> str:
    """A comparable string of a node's (possibly symbolic) shape."""
    val = node.meta.get("val")
    return str(tuple(val.shape)) if isinstance(val, torch.Tensor) else ""


@dataclass(frozen=True)
class Scope:
    key: str      # nn_module_stack key of one module call
    path: str     # module path in the source model (wrapper prefix stripped)
    type: str     # class name


@dataclass(eq=False)  # identity: units are dict keys
class Unit:
    """A weighted op or a norm, grouped with its module call."""

    kind: str                 # "linear" | "embedding" | "norm"
    op: str                   # short op: linear, embedding, layer_norm, rms_norm
    core: Node                # the weighted op / norm op itself
    out: Node                 # node whose output is the unit's activation
    scope: Scope
    members: frozenset[str]   # fx node names belonging to the unit
    weight: str | None = None
    bias: str | None = None
    layout: str | None = None


@dataclass
class Attention:
    scores: Node              # Q x K^T (before scaling)
    probs: Node               # softmax output
    context: Node             # probs x V (per head; naming merges heads)
    scope: Scope              # the module computing it


@dataclass
class GraphFacts:
    gm: torch.fx.GraphModule
    dg: nx.DiGraph
    order: dict[str, int]
    scopes: dict[str, tuple[Scope, ...]]     # node name -> stack, outermost first
    units: list[Unit]
    unit_of: dict[str, Unit]                 # member node name -> unit
    attentions: list[Attention]
    blocks: list[Scope] = field(default_factory=list)

    def node(self, name: str) -> Node:
        return self.dg.nodes[name]["node"]

    def in_scope(self, node: Node, scope: Scope) -> bool:
        return any(s.key == scope.key for s in self.scopes.get(node.name, ()))

    def innermost(self, node: Node) -> Scope | None:
        stack = self.scopes.get(node.name, ())
        return stack[-1] if stack else None


def build_facts(gm: torch.fx.GraphModule, strip) -> GraphFacts:
    """Collect units, attention patterns and blocks of ``gm``; ``strip`` maps module paths."""
    dg = nx.DiGraph()
    nodes = list(gm.graph.nodes)
    for node in nodes:
        dg.add_node(node.name, node=node)
        for arg in node.all_input_nodes:
            dg.add_edge(arg.name, node.name)
    scopes = {n.name: _stack(n, strip) for n in nodes}
    facts = GraphFacts(gm, dg, {n.name: i for i, n in enumerate(nodes)}, scopes, [], {}, [])
    facts.units = _units(facts, nodes)
    facts.unit_of = {m: u for u in facts.units for m in u.members}
    facts.attentions = [a for n in nodes if opname(n) in SOFTMAX_OPS
                        for a in [_attention(facts, n)] if a is not None]
    facts.blocks = _blocks(facts)
    return facts


def _stack(node: Node, strip) -> tuple[Scope, ...]:
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, value in stack.items():
        path, cls = (value if isinstance(value, tuple) else (str(value), ""))
        if not isinstance(path, str) or key.startswith("_empty_nn_module_stack"):
            continue
        type_name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", "")
        out.append(Scope(key, strip(path), type_name))
    return tuple(out)


def _groups(facts: GraphFacts, nodes: list[Node]) -> dict[str, list[Node]]:
    """Innermost module call key -> its nodes in graph order."""
    groups: dict[str, list[Node]] = {}
    for node in nodes:
        stack = facts.scopes[node.name]
        if stack and node.op == "call_function":
            groups.setdefault(stack[-1].key, []).append(node)
    return groups


def _units(facts: GraphFacts, nodes: list[Node]) -> list[Unit]:
    groups = _groups(facts, nodes)
    units = [u for n in nodes for u in [_weighted_unit(facts, n, groups)] if u is not None]
    taken = {m for u in units for m in u.members}
    units += [u for key, members in groups.items()
              for u in [_norm_unit(facts, key, members)] if u is not None
              and not (u.members & taken)]
    units.sort(key=lambda u: facts.order[u.out.name])
    return units


def _weighted_unit(facts: GraphFacts, node: Node, groups) -> Unit | None:
    spec = WEIGHTED_OPS.get(opname(node))
    if spec is None:
        return None
    _, w_idx, b_idx, layout = spec
    args = node.args
    weight = args[w_idx] if len(args) > w_idx else None
    if not (isinstance(weight, Node) and weight.op == "get_attr"):
        return None
    bias = args[b_idx] if b_idx is not None and len(args) > b_idx else None
    bias = bias.target if isinstance(bias, Node) and bias.op == "get_attr" else None
    scope = facts.innermost(node) or Scope("", "", "")
    group = groups.get(scope.key, [node])
    alone = sum(opname(n) in WEIGHTED_OPS for n in group) == 1
    members = group if alone else [node]
    tensors = [n for n in members if is_tensor(n)]
    kind = "embedding" if opname(node) == "embedding" else "linear"
    return Unit(kind, opname(node) if kind == "embedding" else "linear", node, tensors[-1],
                scope, frozenset(n.name for n in members), weight.target, bias, layout)


def _norm_unit(facts: GraphFacts, key: str, members: list[Node]) -> Unit | None:
    """A module call computing a norm: a norm op, or ``x * rsqrt(mean(..) + eps)``."""
    ops = [opname(n) for n in members]
    if any(op in WEIGHTED_OPS or op in MATMUL_OPS or op in SOFTMAX_OPS for op in ops):
        return None
    core = next((n for n in members if opname(n) in NORM_OPS), None)
    if core is not None:
        op = NORM_OPS[opname(core)]
    elif "rsqrt" in ops and "mean" in ops:
        core = members[ops.index("rsqrt")]
        op = "layer_norm" if "sub" in ops or "var_mean" in ops else "rms_norm"
    else:
        return None
    tensors = [n for n in members if is_tensor(n)]
    if not tensors:
        return None
    scope = facts.scopes[members[0].name][-1]
    return Unit("norm", op, core, tensors[-1], scope, frozenset(n.name for n in members))


def _attention(facts: GraphFacts, softmax: Node) -> Attention | None:
    scores = _walk_back(softmax, SCORE_OPS, MATMUL_OPS)
    context = _walk_forward(softmax, PASSTHROUGH_OPS, MATMUL_OPS)
    if scores is None or context is None:
        return None
    return Attention(scores, softmax, context, facts.innermost(softmax) or Scope("", "", ""))


def _walk_back(node: Node, through: set[str], until: set[str]) -> Node | None:
    """Follow first tensor args back through ``through`` ops to an ``until`` op."""
    seen: set[str] = set()
    frontier = [a for a in node.all_input_nodes if is_tensor(a)]
    while frontier:
        cur = frontier.pop(0)
        if cur.name in seen:
            continue
        seen.add(cur.name)
        if opname(cur) in until:
            return cur
        if opname(cur) in through:
            frontier += [a for a in cur.all_input_nodes if is_tensor(a)]
    return None


def _walk_forward(node: Node, through: set[str], until: set[str]) -> Node | None:
    """Follow users through ``through`` ops to an ``until`` op taking it as first arg."""
    frontier = [node]
    while frontier:
        cur = frontier.pop(0)
        for user in cur.users:
            if opname(user) in until and user.args and user.args[0] is cur:
                return user
            if opname(user) in through and user.args and user.args[0] is cur:
                frontier.append(user)
    return None


def _blocks(facts: GraphFacts) -> list[Scope]:
    """One scope per attention (an eager one's softmax, or a fused attention's call):
    the outermost ModuleList element holding only it."""
    anchors = [att.probs.name for att in facts.attentions] + [
        n.name for n in facts.gm.graph.nodes
        if n.op == "call_module" and str(n.target).startswith(FUSED_ATTENTION_PREFIX)]
    counts: dict[str, int] = {}
    for name in anchors:
        for scope in facts.scopes[name]:
            counts[scope.key] = counts.get(scope.key, 0) + 1
    blocks = []
    for name in anchors:
        stack = facts.scopes[name]
        single = [s for s in stack if counts[s.key] == 1 and s.path]
        listed = [s for s in single if s.path.rsplit(".", 1)[-1].isdigit()]
        if listed:
            blocks.append(listed[0])
        elif len(stack) >= 2:
            blocks.append(stack[-2] if counts[stack[-2].key] == 1 else stack[-1])
    unique = {b.key: b for b in blocks}
    return sorted(unique.values(), key=lambda s: _first_index(facts, s))


def _first_index(facts: GraphFacts, scope: Scope) -> int:
    return min(facts.order[n] for n, stack in facts.scopes.items()
               if any(s.key == scope.key for s in stack))


# -- searches used by naming -------------------------------------------------

def linears_behind(facts: GraphFacts, node: Node) -> list[Unit]:
    """Linear units reached going back from ``node``, stopping at each one found."""
    found: dict[str, Unit] = {}
    seen: set[str] = set()
    frontier = [node]
    while frontier:
        cur = frontier.pop()
        if cur.name in seen:
            continue
        seen.add(cur.name)
        unit = facts.unit_of.get(cur.name)
        if unit is not None and unit.kind == "linear":
            found[unit.core.name] = unit
            continue
        frontier += [a for a in cur.all_input_nodes if a.op == "call_function"]
    return sorted(found.values(), key=lambda u: facts.order[u.core.name])


def unit_input(facts: GraphFacts, unit: Unit) -> Node:
    """The tensor entering a unit from outside its module call."""
    spec = WEIGHTED_OPS.get(opname(unit.core))
    cur = unit.core.args[spec[0]] if spec else unit.core.args[0]
    while isinstance(cur, Node) and cur.name in unit.members and cur.args:
        cur = cur.args[0]
    return cur


def skip_passthrough_back(node: Node) -> Node:
    """``dropout(to(x))`` -> ``x``."""
    while opname(node) in PASSTHROUGH_OPS and node.args and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def has_nonlinearity(facts: GraphFacts, start: Node, stop: Unit) -> bool:
    """Whether the path from ``stop``'s output back from ``start`` has a nonlinear op."""
    between = nx.descendants(facts.dg, stop.out.name) & (nx.ancestors(facts.dg, start.name)
                                                          | {start.name})
    return any(opname(facts.node(name)) in NONLINEAR_OPS for name in between)


# -- structural hash -------------------------------------------------------------

def graph_hash(gm: torch.fx.GraphModule) -> str:
    """sha256 over (op, target, inputs as positions, constants), not weights or node names."""
    index = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    digest = hashlib.sha256()
    for node in gm.graph.nodes:
        target = node.target if isinstance(node.target, str) else (
            getattr(node.target, "__qualname__", None) or str(node.target))
        if node.op in ("placeholder", "output"):
            target = node.op
        args = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: f"%{index[a.name]}")
        digest.update(f"{node.op}|{target}|{str(args)}\n".encode())
    return digest.hexdigest()[:16]
