"""What the search decides, and what each choice costs.

A **unit** is either the linears reading one tensor (their weights and that shared input:
``attn.q/k/v`` read ``ln_1``, ``mlp.gate/up`` read ``ln_2``: one choice for all, as
the q/k/v and gate/up GEMMs a runtime fuses, and as the one input quantizer the
language allows per tensor), or one other activation (``res_sum``, ``attn.probs``,
``attn.scores``, ...: ``activations="all"``). A candidate gives a linear unit its
weight clause on every linear and its activation clause on the input's producer; an
activation unit takes the distinct activation clauses.

Storage is priced as ``qdsl explain`` prices it (``compiler.render.weight_bytes``:
codes, plus fp32 scales and int32 zero points); a weight tied to a node the search
does not touch (SmolLM2's ``lm_head`` shares the float embedding) costs nothing more
when it stays fp32, and its own copy when it is quantized (the float table stays).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..compiler.render import copy_key, weight_bytes
from ..config.spec import TensorSpec
from ..graph.attrs import graph_tensors, param
from ..graph.inputs import linear_inputs
from ..runtime.conv1d import oriented
from .candidates import Candidate

ACT_ROLES_SKIPPED = ("embedding",)


@dataclass(frozen=True)
class Choice:
    """One option of a unit: the candidate it comes from, the weight spec of every linear
    (None for an activation unit) and the activation spec (None: the linears' input has
    no producer, it stays float)."""

    candidate: int
    weight: TensorSpec | None
    activation: TensorSpec | None
    bytes: float = 0.0

    def act_bits(self) -> int:
        a = self.activation
        return 16 if a is None or not a.quantized else a.bits


@dataclass(frozen=True)
class Unit:
    key: str                       # the producer's name, or the linear's / activation's
    linears: tuple[str, ...]       # the linears deciding together (empty: an activation)
    producer: str | None           # the activation quantized by the choice
    block: int | None
    choices: tuple[Choice, ...]

    @property
    def kind(self) -> str:
        return "linears" if self.linears else "activation"


@dataclass(frozen=True)
class Space:
    units: tuple[Unit, ...]
    candidates: tuple[Candidate, ...]
    fixed_bytes: float             # every other tensor (fp32), each storage once
    searched_numel: int            # weights whose storage the search decides
    gather_bytes: float            # embedding tables read only by lookups (decode model)

    def bytes_of(self, picks: list[int]) -> float:
        return self.fixed_bytes + sum(u.choices[i].bytes for u, i in zip(self.units, picks))

    def bits_per_weight(self, picks: list[int]) -> float:
        searched = sum(u.choices[i].bytes for u, i in zip(self.units, picks))
        return 8 * searched / self.searched_numel if self.searched_numel else 0.0


def _shape(gm, node) -> tuple[int, ...]:
    return tuple(oriented(param(gm, node.weight), node.weight_layout).shape)


def build_space(gm, named, candidates: list[Candidate], activations: str = "inputs") -> Space:
    """The units of ``named`` (its graph ``gm``) and their choices among ``candidates``.
    ``activations``: "inputs" (linear units only) or "all" (also every other activation
    but embeddings' outputs)."""
    by = named.by_name
    inputs = linear_inputs(gm, named.nodes)
    linears = [n for n in named.nodes if n.op == "linear" and n.weight]
    searched = {n.name for n in linears}
    # a linear's weight tied to a node outside the search (SmolLM2's lm_head and the float
    # embedding): kept fp32 it reads that node's copy for nothing; otherwise it is a copy
    # of its own, stored beside the float table (compiler.render.storage_of)
    free = {n.name for n in linears if n.tied and n.tied not in searched}
    shared = copy_key(None)
    groups: dict[tuple[str, str], list[str]] = {}  # (producer, "") or ("", the linear)
    for n in linears:
        li = inputs.get(n.name)
        producer = li.producer if li and li.producer else None
        groups.setdefault((producer, "") if producer else ("", n.name), []).append(n.name)
    units: list[Unit] = []
    for (producer, alone), names in groups.items():
        key = producer or alone
        producer = producer or None
        choices, seen = [], set()
        for i, c in enumerate(candidates):
            a = c.activation if producer else None
            sig = (c.weight, a)
            if sig in seen:
                continue
            seen.add(sig)
            b = sum(weight_bytes(c.weight, _shape(gm, by[m])) for m in names
                    if m not in free or copy_key(c.weight) != shared)
            choices.append(Choice(i, c.weight, a, b))
        blocks = {by[m].block for m in names}
        units.append(Unit(key, tuple(names), producer,
                          blocks.pop() if len(blocks) == 1 else None, tuple(choices)))
    if activations == "all":
        producers = {u.producer for u in units}
        for n in named.nodes:
            if n.name in searched or n.name in producers or n.role in ACT_ROLES_SKIPPED:
                continue
            choices, seen = [], set()
            for i, c in enumerate(candidates):
                if c.activation not in seen:
                    seen.add(c.activation)
                    choices.append(Choice(i, None, c.activation, 0.0))
            units.append(Unit(n.name, (), n.name, n.block, tuple(choices)))
    order = {n.name: i for i, n in enumerate(named.nodes)}
    units.sort(key=lambda u: order[u.linears[0] if u.linears else u.key])
    # the tensors the graph reads, each storage once: a transform that replaced a tied
    # weight (rotate unties lm_head) leaves the old one on the module, read by nothing
    tensors = {id(t): t for t in graph_tensors(gm).values() if t.is_floating_point()}
    decided = {id(param(gm, by[m].weight)) for m in searched - free}
    fixed = sum(t.numel() * 4 for k, t in tensors.items() if k not in decided)
    numel = sum(tensors[k].numel() for k in decided)
    lookups = {id(param(gm, n.weight)) for n in named.nodes if n.role == "embedding" and n.weight
               and not n.tied}
    gather = sum(tensors[k].numel() * 4 for k in lookups if k in tensors)
    return Space(tuple(units), tuple(candidates), float(fixed), numel, float(gather))
