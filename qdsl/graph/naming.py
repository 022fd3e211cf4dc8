"""Canonical, architecture-neutral names and roles for a captured graph's nodes.

``name_graph(captured)`` gives every quantizable node a name such as
``block.3.attn.scores`` or ``block.0.mlp.c_fc`` and a role such as
``attn_scores`` or ``linear``. Names come from graph structure (see
``qdsl.graph.roles`` and docs/naming.md), so one recipe applies to GPT-2, CodeGen,
GPT-J, LLaMA and BERT graphs. Nodes with no structural role keep their module
path (``fc1``), so recipes also work on arbitrary modules.

Each ``NamedNode`` (``qdsl.graph.named``, re-exported here) says where a pass acts: an
activation quantizer goes after fx node ``node``; a weight quantizer replaces the
``get_attr`` target ``weight``.
"""

from __future__ import annotations

import networkx as nx
from torch.fx import Node

from qdsl.graph.attrs import param
from qdsl.graph.inputs import linear_inputs
from qdsl.graph.named import ROLES, Drafts, NamedGraph, NamedNode  # noqa: F401 (re-exported)
from qdsl.graph.ops import INDEX_VIEWS, PASSTHROUGH_OPS, opname
from qdsl.graph.roles import (GraphFacts, Scope, Unit, build_facts, graph_hash, has_nonlinearity,
                              is_tensor, linears_behind, shape_key, skip_passthrough_back,
                              unit_input)


def name_graph(captured) -> NamedGraph:
    """Name the quantizable nodes of a ``Captured`` (or a bare fx GraphModule)."""
    gm = captured.gm if hasattr(captured, "gm") else captured
    strip = captured.module_path if hasattr(captured, "module_path") else (lambda p: p)
    facts = build_facts(gm, strip)
    drafts = Drafts(facts)
    for index, block in enumerate(facts.blocks):
        _name_block(drafts, index, block)
    if facts.blocks:
        _name_outside(drafts)
    _name_leftovers(drafts)
    nodes = drafts.finish()
    return NamedGraph(nodes, {n.name: n for n in nodes}, graph_hash(gm),
                      {n.name: n.module for n in nodes}, len(facts.blocks),
                      linear_inputs(gm, nodes))


# -- blocks ------------------------------------------------------------------

def _name_block(d: Drafts, index: int, block: Scope) -> None:
    facts, pre = d.facts, f"block.{index}."
    att = next(a for a in facts.attentions if facts.in_scope(a.probs, block))
    linears = [u for u in facts.units if u.kind == "linear" and facts.in_scope(u.core, block)]
    qkv = _qkv(facts, att)
    for unit, letters in qkv.items():
        d.unit(pre + "attn." + letters, unit, index)
    out = _attn_out(facts, att, linears, set(qkv))
    d.functional(pre + "attn.scores", "attn_scores", att.scores, index, "matmul", att.scope)
    d.functional(pre + "attn.probs", "softmax", att.probs, index, "softmax", att.scope)
    context = unit_input(facts, out) if out else att.context
    d.functional(pre + "attn.context", "attn_context", context, index, "matmul", att.scope)
    if out:
        d.unit(pre + "attn.out", out, index)
    mlp = [u for u in linears if u not in qkv and u is not out]
    firsts = _name_mlp(d, index, mlp)
    _name_norms(d, index, block, list(qkv), firsts)
    _name_residuals(d, index, block)


def _qkv(facts: GraphFacts, att) -> dict[Unit, str]:
    """Linears reaching Q (scores arg 0), K (scores arg 1) and V (context arg 1)."""
    reach = [linears_behind(facts, att.scores.args[0]), linears_behind(facts, att.scores.args[1]),
             linears_behind(facts, att.context.args[1])]
    units = sorted({u.core.name: u for r in reach for u in r}.values(),
                   key=lambda u: facts.order[u.core.name])
    return {u: "".join(l for l, r in zip("qkv", reach) if u in r) for u in units}


def _attn_out(facts, att, linears: list[Unit], qkv: set[Unit]) -> Unit | None:
    """The first linear after the context with only Q/K/V linears behind it."""
    for unit in linears:
        if unit in qkv or facts.order[unit.core.name] < facts.order[att.context.name]:
            continue
        behind = linears_behind(facts, unit_input(facts, unit))
        if behind and set(behind) <= qkv:
            return unit
    return None


def _name_mlp(d: Drafts, index: int, mlp: list[Unit]) -> list[Unit]:
    """c_fc -> act -> c_proj, or act(gate) * up -> down. Returns the first linears."""
    facts, pre = d.facts, f"block.{index}.mlp."
    feeders = {u: [f for f in linears_behind(facts, unit_input(facts, u)) if f in mlp] for u in mlp}
    firsts = [u for u in mlp if not feeders[u]]
    downs = [u for u in mlp if feeders[u]]
    if len(downs) != 1:
        return firsts
    down, feed = downs[0], feeders[downs[0]]
    joined = skip_passthrough_back(unit_input(facts, down))
    if len(feed) == 2 and opname(joined) == "mul":
        gate_arg, up_arg = _split_gate(facts, joined, feed)
        if gate_arg is not None:
            gate, up = (feed if feed[0] in linears_behind(facts, gate_arg) else feed[::-1])
            d.unit(pre + "gate", gate, index)
            d.unit(pre + "up", up, index)
            d.functional(pre + "act", "act_fn", gate_arg, index, _act_op(facts, gate_arg, gate))
            d.functional(pre + "mul", "gated_mul", joined, index, "mul")
            d.unit(pre + "down", down, index)
            return firsts
    if len(feed) == 1:
        d.unit(pre + "c_fc", feed[0], index)
        d.functional(pre + "act", "act_fn", joined, index, _act_op(facts, joined, feed[0]))
        d.unit(pre + "c_proj", down, index)
    return firsts


def _split_gate(facts, mul: Node, feed: list[Unit]) -> tuple[Node | None, Node | None]:
    """Which operand of ``act(gate) * up`` carries the nonlinearity."""
    a, b = (x for x in mul.args[:2])
    if not (is_tensor(a) and is_tensor(b)):
        return None, None
    a_unit, b_unit = linears_behind(facts, a), linears_behind(facts, b)
    if len(a_unit) != 1 or len(b_unit) != 1:
        return None, None
    if has_nonlinearity(facts, a, a_unit[0]):
        return a, b
    if has_nonlinearity(facts, b, b_unit[0]):
        return b, a
    return None, None


# activation op name from the ops between the first linear and the act output
_ACT_SIGNATURES = (("gelu", "gelu"), ("silu", "silu"), ("relu", "relu"), ("tanh", "gelu"),
                   ("erf", "gelu"), ("sigmoid", "silu"))


def _act_op(facts: GraphFacts, act: Node, first: Unit) -> str:
    between = nx.descendants(facts.dg, first.out.name) & (nx.ancestors(facts.dg, act.name)
                                                           | {act.name})
    ops = {opname(facts.node(n)) for n in between}
    return next((name for op, name in _ACT_SIGNATURES if op in ops), opname(act))


def _name_norms(d: Drafts, index: int, block: Scope, attn_in: list[Unit],
                mlp_in: list[Unit]) -> None:
    facts, pre = d.facts, f"block.{index}."
    norms = [u for u in facts.units if u.kind == "norm" and facts.in_scope(u.core, block)]
    feeding = lambda units: {skip_passthrough_back(unit_input(facts, u)).name for u in units}
    attn_src, mlp_src = feeding(attn_in), feeding(mlp_in)
    for norm in norms:
        if norm.out.name in attn_src:
            d.unit(pre + "ln_1", norm, index)
        elif norm.out.name in mlp_src:
            d.unit(pre + "ln_2", norm, index)


def _name_residuals(d: Drafts, index: int, block: Scope) -> None:
    """Adds continuing the residual stream that enters the block; see docs/naming.md."""
    facts, pre = d.facts, f"block.{index}."
    members = [facts.node(n) for n in facts.order if facts.in_scope(facts.node(n), block)]
    start = _block_input(facts, members, block)
    if start is None:
        return
    stream, adds = _stream(facts, start), []
    for node in members:
        args = [a for a in node.args[:2] if is_tensor(a)]
        if opname(node) == "add" and len(args) == 2 and shape_key(args[0]) == shape_key(args[1]):
            if sum(a.name in stream for a in args) == 1:
                adds.append(node)
                stream = _stream(facts, node)
    names = (["res_sum"] if len(adds) == 1 else
             ["res_attn"] + [f"res_{k}" for k in range(1, len(adds) - 1)] + ["res_sum"])
    for name, node in zip(names, adds):
        d.functional(pre + name, "residual_add", node, index, "add")
    for node in members:  # parallel blocks: attn + mlp summed before the residual add
        if opname(node) == "add" and node not in adds and any(u in adds for u in node.users):
            if all(is_tensor(a) and shape_key(a) == shape_key(node) for a in node.args[:2]):
                d.functional(pre + "parallel_sum", "parallel_add", node, index, "add")
    _name_post_norm(d, index, block, adds)


def _name_post_norm(d: Drafts, index: int, block: Scope, adds: list[Node]) -> None:
    """Post-LN blocks (BERT): the norm right after the closing residual add."""
    facts = d.facts
    for norm in (u for u in facts.units if u.kind == "norm" and facts.in_scope(u.core, block)):
        if adds and norm.core.name not in d.named_units and \
                skip_passthrough_back(unit_input(facts, norm)) is adds[-1]:
            d.unit(f"block.{index}.ln_out", norm, index)


def _block_input(facts: GraphFacts, members: list[Node], block: Scope) -> Node | None:
    """The hidden-state tensor entering the block (same shape as the one leaving it)."""
    inside = {n.name for n in members}
    leaving = [n for n in members if is_tensor(n) and any(u.name not in inside for u in n.users)]
    if not leaving:
        return None
    out_shape = shape_key(leaving[-1])
    entering = {a.name: a for n in members for a in n.all_input_nodes
                if a.name not in inside and is_tensor(a) and a.meta["val"].is_floating_point()
                and shape_key(a) == out_shape}
    if not entering:
        return None
    return max(entering.values(), key=lambda n: facts.order[n.name])


def _stream(facts: GraphFacts, start: Node) -> set[str]:
    """``start`` and what carries it unchanged: passthrough ops and norms (post-LN)."""
    seen, frontier = {start.name}, [start]
    while frontier:
        cur = frontier.pop()
        for user in cur.users:
            nexts = []
            if opname(user) in PASSTHROUGH_OPS and user.args and user.args[0] is cur:
                nexts.append(user)
            unit = facts.unit_of.get(user.name)
            if unit is not None and unit.kind == "norm" and unit_input(facts, unit) is cur:
                nexts.append(unit.out)
            for nxt in nexts:
                if nxt.name not in seen:
                    seen.add(nxt.name)
                    frontier.append(nxt)
    return seen


# -- outside the blocks -------------------------------------------------------

def _name_outside(d: Drafts) -> None:
    """Embeddings and their sum before block 0; ln_f and lm_head after the last block."""
    facts = d.facts
    first, last = _block_span(facts, facts.blocks[0])[0], _block_span(facts, facts.blocks[-1])[1]
    before = [u for u in facts.units if facts.order[u.out.name] < first]
    after = [u for u in facts.units if facts.order[u.core.name] > last]
    _name_embeddings(d, [u for u in before if u.kind == "embedding"])
    pre_norms = [u for u in before if u.kind == "norm"]
    if pre_norms:
        d.unit("embed.ln", pre_norms[0], None)
    output = next(n for n in facts.gm.graph.nodes if n.op == "output")
    feeding = [u for u in after if nx.has_path(facts.dg, u.out.name, output.name)]
    norms = [u for u in feeding if u.kind == "norm"]
    heads = [u for u in feeding if u.kind == "linear"]
    if norms:
        d.unit("ln_f", norms[-1], None)
    if heads:
        d.unit("lm_head", heads[-1], None)


def _block_span(facts: GraphFacts, block: Scope) -> tuple[int, int]:
    orders = [facts.order[n] for n, stack in facts.scopes.items()
              if any(s.key == block.key for s in stack)]
    return min(orders), max(orders)


def _name_embeddings(d: Drafts, embeds: list[Unit]) -> None:
    """Token embedding (indexed by the first input) = embed; others by table size."""
    facts = d.facts
    if not embeds:
        return
    token = next((u for u in embeds if _indexed_by_input(facts, u)), None)
    token = token or max(embeds, key=lambda u: _rows(facts, u))
    d.unit("embed", token, None)
    others = sorted((u for u in embeds if u is not token), key=lambda u: -_rows(facts, u))
    for k, unit in enumerate(others):
        d.unit(("embed.pos", "embed.type")[k] if k < 2 else f"embed.extra{k - 1}", unit, None)
    outs = {u.out.name for u in embeds}
    sums = [n for n in facts.gm.graph.nodes if opname(n) == "add"
            and facts.order[n.name] < _block_span(facts, facts.blocks[0])[0]
            and sum(_from_embedding(facts, a, outs) for a in n.args[:2]) == 2]
    for k, node in enumerate(sums):
        d.functional("embed.sum" if k == len(sums) - 1 else f"embed.sum.{k}", "embedding_sum",
                     node, None, "add")


def _indexed_by_input(facts: GraphFacts, unit: Unit) -> bool:
    """Indices come (through views) from the graph's first input."""
    first = next(n for n in facts.gm.graph.nodes if n.op == "placeholder")
    cur = unit.core.args[1]
    while isinstance(cur, Node) and opname(cur) in INDEX_VIEWS:
        cur = cur.args[0]
    return cur is first


def _rows(facts: GraphFacts, unit: Unit) -> int:
    return int(param(facts.gm, unit.weight).shape[0])


def _from_embedding(facts: GraphFacts, arg, outs: set[str]) -> bool:
    if not is_tensor(arg):
        return False
    return arg.name in outs or bool(outs & nx.ancestors(facts.dg, arg.name))


# -- everything else -----------------------------------------------------------

def _name_leftovers(d: Drafts) -> None:
    """Units with no structural role keep their module path (inside a block: relative)."""
    facts = d.facts
    for unit in facts.units:
        if unit.core.name in d.named_units:
            continue
        block = next((i for i, b in enumerate(facts.blocks) if facts.in_scope(unit.core, b)), None)
        path = unit.scope.path
        if block is not None:
            prefix = facts.blocks[block].path + "."
            path = f"block.{block}." + (path[len(prefix):] if path.startswith(prefix) else path)
        if len(unit.members) == 1 and _shared_scope(facts, unit):
            path = f"{path}.{unit.op}" if path else unit.op
        d.unit(path or unit.op, unit, block)


def _shared_scope(facts: GraphFacts, unit: Unit) -> bool:
    return sum(u.scope.key == unit.scope.key for u in facts.units) > 1 or not unit.scope.path

