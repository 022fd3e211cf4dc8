"""What a canonical name is: ``NamedNode`` (one quantizable node: its name, role and
where a pass acts), ``NamedGraph`` (all of a graph's, in graph order) and ``Drafts``
(names being given, each fx node and unit once, ties recorded at the end).
``qdsl.graph.naming`` finds the names; this module only holds them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch.fx import Node

from qdsl.graph.roles import GraphFacts, Scope, Unit

# Every role a NamedNode can have (docs/naming.md describes each).
ROLES = ("embedding", "embedding_sum", "norm", "linear", "attn_scores", "softmax",
         "attn_context", "act_fn", "gated_mul", "residual_add", "parallel_add")


@dataclass(frozen=True)
class NamedNode:
    name: str                         # canonical: "block.0.attn.qkv"
    role: str                         # one of ROLES
    block: int | None                 # block index, None outside blocks
    module: str                       # source model's module path (the enclosing one if functional)
    module_type: str                  # class name: Linear, Conv1D, LlamaRMSNorm, GPT2Attention
    op: str                           # short op: linear, layer_norm, matmul, softmax, add, gelu
    node: str                         # fx node whose OUTPUT is the activation
    weight: str | None = None         # get_attr target of the weight (linears / embeddings)
    bias: str | None = None           # get_attr target of the bias
    weight_layout: str | None = None  # "out_in" (nn.Linear) | "in_out" (Conv1D) | None
    tied: str | None = None           # canonical name of another node sharing this weight

    @property
    def has_weight(self) -> bool:
        return self.weight is not None

    @property
    def has_activation(self) -> bool:
        return bool(self.node)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class NamedGraph:
    nodes: tuple[NamedNode, ...]      # graph order of their activation nodes
    by_name: dict[str, NamedNode]
    graph_hash: str
    module_map: dict[str, str]        # canonical name -> module path
    blocks: int
    # linear's canonical name -> what it reads (qdsl.graph.inputs.LinearInput); empty for
    # graphs named without it (tests' synthetic graphs): `.input` rules then find nothing
    inputs: dict = field(default_factory=dict, compare=False)

    def __getitem__(self, name: str) -> NamedNode:
        return self.by_name[name]

    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def to_json(self) -> dict:
        return {"graph_hash": self.graph_hash, "blocks": self.blocks,
                "nodes": [n.to_json() for n in self.nodes]}


class Drafts:
    """Names given so far; each fx activation node and each unit is named once."""

    def __init__(self, facts: GraphFacts):
        self.facts = facts
        self.items: dict[str, NamedNode] = {}
        self.named_units: set[str] = set()

    def unit(self, name: str, unit: Unit, block: int | None, role: str | None = None) -> None:
        role = role or ("norm" if unit.kind == "norm" else unit.kind)
        self._add(NamedNode(name, role, block, unit.scope.path, unit.scope.type, unit.op,
                            unit.out.name, unit.weight, unit.bias, unit.layout))
        self.named_units.add(unit.core.name)

    def functional(self, name: str, role: str, node: Node, block: int | None, op: str,
                   scope: Scope | None = None) -> None:
        scope = scope or self.facts.innermost(node) or Scope("", "", "")
        self._add(NamedNode(name, role, block, scope.path, scope.type, op, node.name))

    def _add(self, item: NamedNode) -> None:
        name, k = item.name, 1
        while name in self.items:  # only fallback names can collide
            name, k = f"{item.name}.{k}", k + 1
        self.items[name] = NamedNode(**{**item.to_json(), "name": name})

    def finish(self) -> tuple[NamedNode, ...]:
        items = sorted(self.items.values(), key=lambda n: self.facts.order[n.node])
        owners: dict[str, list[str]] = {}
        for item in items:
            if item.weight:
                owners.setdefault(item.weight, []).append(item.name)
        return tuple(NamedNode(**{**i.to_json(), "tied": _other(owners.get(i.weight), i.name)})
                     for i in items)


def _other(names: list[str] | None, me: str) -> str | None:
    others = [n for n in names or () if n != me]
    return others[0] if others else None
