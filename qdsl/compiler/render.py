"""``qdsl explain``: what a recipe selects in a model, before any data.

Renders a QuantPlan over a NamedGraph as a table, a summary (nodes per bit
width, weight storage before/after), JSON, or a picture of one block with each
node coloured by its precision.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import torch

from ..errors import OptionError
from ..graph.attrs import param
from ..models.limits import check_block
from ..plan import PlanEntry, QuantPlan
from ..runtime.conv1d import oriented
from ..config.spec import GroupWise, PerChannel, PerTensor, TensorSpec

_FLOAT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def weight_bytes(spec: TensorSpec | None, shape: tuple[int, ...]) -> float:
    """Storage of one weight under ``spec``, scales and zero points included.

    >>> weight_bytes(TensorSpec("weight", 8, granularity=PerChannel()), (768, 3072))
    2362368.0
    """
    numel = 1
    for s in shape:
        numel *= s
    if spec is None or not spec.quantized:
        return float(numel * _FLOAT_BYTES[spec.float_dtype if spec else "fp32"])
    rows = shape[0]
    g = spec.granularity
    n_params = (1 if isinstance(g, PerTensor) else rows if isinstance(g, PerChannel)
                else rows * (numel // rows) // g.size if isinstance(g, GroupWise) else rows)
    per_param = 4 if spec.symmetric else 8  # fp32 scale (+ int32 zero point)
    return numel * spec.bits / 8 + n_params * per_param


@dataclass(frozen=True)
class Storage:
    before: float  # bytes, every parameter in fp32
    after: float   # bytes under the plan (unquantized parameters stay fp32)
    # the same without the tensors of the named nodes outside the blocks (the embedding
    # tables and lm_head: what most recipes keep float, and what a paper's nominal
    # "8-bit = 4x" leaves out)
    body_before: float = 0.0
    body_after: float = 0.0

    @property
    def compression(self) -> float | None:
        return self.before / self.after if self.after else None

    @property
    def body_compression(self) -> float | None:
        return self.body_before / self.body_after if self.body_after else None


def storage(gm: torch.nn.Module, named, plan: QuantPlan) -> Storage:
    """Estimated parameter storage before and after, counting shared (tied) tensors once."""
    return storage_of(named, plan, lambda target: param(gm, target),
                      list(gm.parameters()) + list(gm.buffers()))


def storage_of(named, plan: QuantPlan, weight_of, tensors) -> Storage:
    """Storage of ``tensors`` (each counted once) with each named node's weight
    (``weight_of(node.weight)``, None where it is not among them) priced by the plan. A
    tensor shared by two nodes (a tied embedding and lm_head) is stored once per distinct
    spec, as the lowering stores it: one int8 table when both are ``w8 per_channel``, but
    the float table *and* lm_head's codes when the embedding stays float. The body
    (``Storage.body_*``) leaves out the weights and biases of the named nodes outside
    the blocks (embeddings, lm_head)."""
    cost: dict[int, dict[str, float]] = {}
    outside: set[int] = set()
    for node in named.nodes:
        w = weight_of(node.weight) if node.weight else None
        if w is not None:
            spec = plan[node.name].weight
            # per output channel: a Conv1D's [in, out] weight counted as [out, in]
            c = weight_bytes(spec, tuple(oriented(w, node.weight_layout).shape))
            cost.setdefault(id(w), {})[copy_key(spec)] = c
            if node.block is None:
                b = weight_of(node.bias) if node.bias else None
                outside |= {id(w)} | ({id(b)} if b is not None else set())
    before = after = body_before = body_after = 0.0
    for t in {id(t): t for t in tensors if t.is_floating_point()}.values():
        fp32 = t.numel() * 4
        now = sum(cost[id(t)].values()) if id(t) in cost else fp32
        before, after = before + fp32, after + now
        if id(t) not in outside:
            body_before, body_after = body_before + fp32, body_after + now
    return Storage(before, after, body_before, body_after)


def copy_key(spec: TensorSpec | None) -> str:
    """Which stored copy of a weight ``spec`` needs: two nodes sharing a tensor share a
    copy only when their keys are equal (float: its dtype; quantized: the whole spec)."""
    if spec is None or not spec.quantized:
        return "float:" + (spec.float_dtype if spec else "fp32")
    return json.dumps(spec.to_json(), sort_keys=True)


def _cell(spec: TensorSpec | None) -> str:
    return "-" if spec is None else spec.describe()


def rows(plan: QuantPlan, named, execution=None) -> list[dict[str, Any]]:
    """One dict per named node: the keys of `--format json` and of the table."""
    out = []
    for node in named.nodes:
        e: PlanEntry = plan[node.name]
        row = {"name": e.name, "role": e.role, "module": e.module,
               "weight": _cell(e.weight), "activation": _cell(e.activation),
               "rule": _rule_cell(e), "weight_spec": e.weight.to_json() if e.weight else None,
               "activation_spec": e.activation.to_json(), "decided_by": e.decided_by}
        li = getattr(named, "inputs", {}).get(node.name)
        if li is not None:  # a linear: what it reads (its producer's output activation)
            row["input"] = _input_cell(plan, li)
            row["input_from"] = li.producer
        if execution is not None:
            row["exec"] = execution(e)
        out.append(row)
    return out


def _input_cell(plan: QuantPlan, li) -> str:
    """A linear's input: its producer's activation spec and the producer's name
    (without ``block.N.``), or where the input comes from if no named node makes it."""
    if li.producer is None:
        return f"float (not a named output: {li.via.split(' ')[0]})"
    short = li.producer.split(".", 2)[2] if li.producer.startswith("block.") else li.producer
    return f"{plan[li.producer].activation.describe()} <- {short}"


def _rule_cell(e: PlanEntry) -> str:
    w, a = e.rule("weight"), e.rule("activation")
    if e.weight is None or w == a:
        return a
    return f"w {w}; a {a}"


def render_table(table_rows: list[dict[str, Any]]) -> str:
    cols = ["name", "role", "module", "weight", "activation", "rule"]
    if any("input" in r for r in table_rows):  # linears: the activation they read
        cols.insert(4, "input")
    if table_rows and "exec" in table_rows[0]:
        cols.insert(cols.index("rule"), "exec")
    widths = {c: max([len(c)] + [len(str(r.get(c, "-"))) for r in table_rows]) for c in cols}
    line = "  ".join(c.ljust(widths[c]) for c in cols)
    out = [line, "  ".join("-" * widths[c] for c in cols)]
    out += ["  ".join(str(r.get(c, "-")).ljust(widths[c]) for c in cols).rstrip()
            for r in table_rows]
    return "\n".join(out)


def render_summary(plan: QuantPlan, gm: torch.nn.Module, named) -> str:
    def bits(spec: TensorSpec | None) -> str:
        return "float" if not spec.quantized else f"{spec.bits}-bit"

    w = Counter(bits(e.weight) for e in plan.entries if e.weight is not None)
    a = Counter(bits(e.activation) for e in plan.entries)
    st = storage(gm, named, plan)
    mib, mb = 1024 * 1024, 1e6
    fmt = lambda c: ", ".join(f"{k}: {v}" for k, v in sorted(c.items()))  # noqa: E731
    return "\n".join([
        f"nodes: {len(plan.entries)} ({len(plan.quantized())} quantized)",
        f"weights     {fmt(w)}",
        f"activations {fmt(a)}",
        f"parameter storage: {st.before / mib:.2f} MiB fp32 -> {st.after / mib:.2f} MiB "
        f"({st.after / st.before:.2%}; {st.after / mb:.3f} MB, as `qdsl search --size` counts)",
        f"  without the embeddings and lm_head: {st.body_before / mib:.2f} MiB -> "
        f"{st.body_after / mib:.2f} MiB ({st.body_compression or 0:.2f}x; the whole "
        f"model {st.compression or 0:.2f}x)",
        *transform_lines(plan),
        f"graph {plan.graph_hash}  recipe {plan.recipe_hash}",
    ])


def transform_lines(plan: QuantPlan) -> list[str]:
    """What the plan's transforms will change: SmoothQuant groups (tensor -> readers,
    folded where) and the rotation."""
    out = []
    for t in plan.transforms:
        if t.kind == "rotate":
            out.append(f"transform rotate ({t.loc}): residual stream by a Hadamard matrix, "
                       "norm scales folded, online Hadamard before each mlp.down")
        else:
            out.append(f"transform smooth ({t.loc}, alpha {t.alpha:g}): {t.producer} -> "
                       f"{', '.join(t.consumers)} (folded into {t.fold_kind} {t.fold})")
    return out


def dataflow(gm: torch.fx.GraphModule, named):
    """networkx DiGraph over canonical names: an edge A -> B when B's node is reached
    from A's output without passing through another named node."""
    fx_to_name = {n.node: n.name for n in named.nodes}
    nodes = {n.name: n for n in gm.graph.nodes}
    g = nx.DiGraph()
    for n in named.nodes:
        g.add_node(n.name)
        stack, seen = list(nodes[n.node].users), set()
        while stack:
            u = stack.pop()
            if u.name in seen:
                continue
            seen.add(u.name)
            if u.name in fx_to_name and fx_to_name[u.name] != n.name:
                g.add_edge(n.name, fx_to_name[u.name])
            else:
                stack.extend(u.users)
    return g


def _colour(spec: TensorSpec) -> str:
    if not spec.quantized:
        return "#d9d9d9"  # float
    return {16: "#9ecae1", 8: "#fdd49e", 4: "#fc8d59"}.get(spec.bits, "#d7301f")


def draw_block(gm: torch.fx.GraphModule, named, plan: QuantPlan, path: str,
               block: int = 0) -> None:
    """Draw ``block`` (its named nodes and the dataflow between them) to a .png/.svg,
    each node coloured by its activation precision, weights written under the name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    prefix = f"block.{block}."
    g = dataflow(gm, named)
    sub = g.subgraph([n for n in g.nodes if n.startswith(prefix)]).copy()
    if not sub.nodes:
        blocks = {n.split(".")[1] for n in g.nodes if n.startswith("block.")}
        check_block("block", block, len(blocks))
        raise OptionError(f"block {block}: no named nodes to draw")
    depth: dict[str, int] = {}
    for n in nx.topological_sort(sub):
        depth[n] = max((depth[p] + 1 for p in sub.predecessors(n)), default=0)
    layers: dict[int, list[str]] = {}
    for n, d in depth.items():
        layers.setdefault(d, []).append(n)
    pos = {n: (i - (len(ns) - 1) / 2, -d) for d, ns in layers.items() for i, n in enumerate(ns)}
    def short(spec: TensorSpec) -> str:
        return f"{spec.kind[0]}{spec.bits}" if spec.quantized else f"{spec.kind[0]} {spec.float_dtype}"

    labels = {n: "\n".join([n[len(prefix):]] + [short(s) for s in (plan[n].weight, plan[n].activation)
                                                  if s is not None]) for n in sub.nodes}
    fig, ax = plt.subplots(figsize=(8, 1.3 * (max(layers) + 2)))
    near = [(u, v) for u, v in sub.edges if depth[v] - depth[u] == 1]
    far = [(u, v) for u, v in sub.edges if depth[v] - depth[u] != 1]  # skip connections
    nx.draw_networkx_edges(sub, pos, edgelist=near, ax=ax, arrows=True, node_size=1700,
                           edge_color="#555555", node_shape="s")
    nx.draw_networkx_edges(sub, pos, edgelist=far, ax=ax, arrows=True, node_size=1700,
                           edge_color="#1f78b4", node_shape="s", connectionstyle="arc3,rad=0.35")
    nx.draw_networkx_nodes(sub, pos, ax=ax, node_size=1700, node_shape="s",
                           node_color=[_colour(plan[n].activation) for n in sub.nodes],
                           edgecolors="#333333")
    nx.draw_networkx_labels(sub, pos, labels, ax=ax, font_size=7)
    ax.legend(handles=[Patch(color=c, label=t) for t, c in
                       [("float", "#d9d9d9"), ("16-bit", "#9ecae1"), ("8-bit", "#fdd49e"),
                        ("4-bit", "#fc8d59"), ("< 4-bit", "#d7301f")]],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, title="activation")
    ax.set_title(f"block {block}: precision per node")
    ax.axis("off")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
