"""A captured graph cut into stages (before the blocks, block 0 ... N-1, after the
blocks) and run stage-major: every calibration batch through one stage, then the next.

Stage of a node: the block whose module scope it runs in (``graph.roles`` blocks);
a node outside every block belongs to the stage before the blocks until the first
block node, then to the running block, and after the last block node to the stage
after the blocks; never to a stage before one of its inputs (a block node reading a
later block is a GraphError: the graph is not sequential in its blocks). get_attr
nodes have no stage: a tensor is read when a node uses it, so a parameter needs to be
real only while the stages using it run (``Stages.params``).

The values crossing a stage boundary (the residual stream, positions, the mask) are
kept per batch between stages; every value is dropped right after its last use (as
the GraphModule's generated code drops it), inside a stage too. A node nothing needs
is not run: one whose value reaches no observer (a call_module), no in-place update
of the state and no other side effect (``Node.is_impure``), such as the logits of a
language model whose lm_head output is not quantized: the head stage then holds the
lm_head weight, not also a [window, vocab] float tensor. Run-time state
(cache counters: the small non-parameter tensors) is saved per batch after a stage
and put back before its next, so each batch sees the state a whole-graph run gives
it; a block's key/value cache is used by its stage only, where the batches run in
the whole-graph order. Each calibration window starts at position 0 (the graph sets
its counters from ``cache_position`` first), as in ``GraphLM.logits``. Each node runs the aten op the
GraphModule's generated code runs, on the same values: the observers see the float
values of the in-memory ``calibrate`` exactly.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import fx

from ..errors import GraphError
from ..graph.attrs import param
from ..graph.roles import build_facts
from ..progress import Progress
from ..progress import bar as progress_bar

PRE = -1  # the stage before the blocks
SMALL_STATE = 64


class Stages:
    def __init__(self, gm: fx.GraphModule, strip):
        self.gm = gm
        facts = build_facts(gm, strip)
        keys = {b.key: i for i, b in enumerate(facts.blocks)}
        self.blocks = len(facts.blocks)
        nodes = [n for n in gm.graph.nodes if n.op not in ("get_attr", "output")]

        def block_of(n: fx.Node) -> int | None:
            for s in facts.scopes.get(n.name, ()):
                if s.key in keys:
                    return keys[s.key]
            return None

        self.live = _needed(nodes)
        own = {n: block_of(n) for n in nodes}
        last_block_node = max((i for i, n in enumerate(nodes) if own[n] is not None),
                              default=-1)
        self.stage: dict[fx.Node, int] = {}
        running = PRE
        for i, n in enumerate(nodes):
            inputs = max((self.stage[a] for a in n.all_input_nodes if a in self.stage),
                         default=PRE)
            if own[n] is not None:
                if own[n] < inputs:
                    raise GraphError(f"node {n.name} of block {own[n]} reads a value of stage "
                                     f"{inputs}: the graph does not run its blocks in order, "
                                     "so it cannot be compiled with --stream", node=n.name)
                running = own[n]
                s = own[n]
            else:
                s = max(running if i < last_block_node else self.blocks, inputs)
            self.stage[n] = s
        self.order = [PRE, *range(self.blocks), self.blocks]
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        self._nodes: dict[int, list[fx.Node]] = {s: [] for s in self.order}
        for n in nodes:
            if n in self.live:
                self._nodes[self.stage[n]].append(n)
        self.last_use = {n: max((self.stage[u] for u in n.users if u in self.live),
                                default=self.stage[n]) for n in nodes}
        self._free = self._free_points()
        self.state = self._shared_state()

    # ------------------------------------------------------------------ what a stage reads

    def nodes(self, stage: int) -> list[fx.Node]:
        """The nodes ``stage`` runs, graph order (those nothing needs left out)."""
        return self._nodes[stage]

    def _free_points(self) -> dict[int, dict[int, list[fx.Node]]]:
        """stage -> position in ``nodes(stage)`` -> the values to drop after that node
        runs: each value after its last user, in the stage of its last use."""
        pos = {n: i for s in self.order for i, n in enumerate(self._nodes[s])}
        out: dict[int, dict[int, list[fx.Node]]] = {s: {} for s in self.order}
        for n in pos:
            last = self.last_use[n]
            users = [pos[u] for u in n.users if u in pos and self.stage[u] == last]
            at = max(users) if users else (pos[n] if self.stage[n] == last else -1)
            out[last].setdefault(at, []).append(n)
        return out

    def params(self, stage: int) -> list[str]:
        """get_attr targets the nodes of ``stage`` read, graph order, once each."""
        out: dict[str, None] = {}
        for n in self.nodes(stage):
            for a in n.all_input_nodes:
                if a.op == "get_attr":
                    out[a.target] = None
        return list(out)

    def _shared_state(self) -> list[str]:
        """The graph's small run-time state: non-parameter tensors of at most
        ``SMALL_STATE`` elements (cache counters, positions). Written in place through
        aliases a stage keeps (``to``, ``select``), they cannot be told apart statically
        from constants; saving a few scalars per batch is cheap. The key/value cache of
        a block is read and written by that block's stage only."""
        params = {k for k, _ in self.gm.named_parameters(remove_duplicate=False)}
        out = set()
        for n in self.gm.graph.nodes:
            if n.op == "get_attr" and n.target not in params:
                t = param(self.gm, n.target)
                if isinstance(t, torch.Tensor) and t.numel() <= SMALL_STATE:
                    out.add(n.target)
        return sorted(out)

    # ------------------------------------------------------------------ running

    @torch.inference_mode()
    def run(self, batches: list[dict[str, Any]], *, progress: Progress = False,
            before=None, after=None) -> None:
        """Run every stage over ``batches`` (placeholder name -> value), stage-major.
        ``before(stage)`` / ``after(stage)``: called around each stage (materialise
        its parameters; freeze its quantizers and free them)."""
        envs: list[dict[fx.Node, Any]] = [{} for _ in batches]
        saved: list[dict[str, torch.Tensor]] = [{} for _ in batches]
        for stage in self.order:
            if before is not None:
                before(stage)
            nodes, free = self.nodes(stage), self._free[stage]
            desc = ("embedding" if stage == PRE else "head" if stage == self.blocks
                    else f"block {stage}/{self.blocks}")
            for i, batch in enumerate(_bar(batches, desc, progress)):
                self._restore(saved[i])
                env = envs[i]
                for n in free.get(-1, ()):
                    env.pop(n, None)
                for j, n in enumerate(nodes):
                    env[n] = self._node(n, env, batch)
                    for d in free.get(j, ()):
                        del env[d]
                for t in self.state:
                    saved[i][t] = param(self.gm, t).clone()
                for n in [n for n in env if self.last_use[n] <= stage]:
                    del env[n]
            if after is not None:
                after(stage)

    def _restore(self, saved: dict[str, torch.Tensor]) -> None:
        for t, v in saved.items():
            param(self.gm, t).copy_(v)

    def _node(self, n: fx.Node, env: dict, batch: dict[str, Any]):
        if n.op == "placeholder":
            if n.name not in batch:
                raise GraphError(f"no input for graph placeholder {n.name}", node=n.name)
            return batch[n.name]

        def value(a: fx.Node):
            return param(self.gm, a.target) if a.op == "get_attr" else env[a]

        args = fx.node.map_arg(n.args, value)
        kwargs = fx.node.map_arg(n.kwargs, value)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_module":
            return self.gm.get_submodule(n.target)(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        raise GraphError(f"cannot run node {n.name} ({n.op}) stage by stage", node=n.name)


def _needed(nodes: list[fx.Node]) -> set[fx.Node]:
    """The nodes whose running matters: placeholders, call_module (observers), impure
    nodes (in-place updates of the cache and counters, asserts), and every node one
    of them reads."""
    live: set[fx.Node] = set()
    for n in reversed(nodes):   # every user of n is decided before n
        if n in live or n.op in ("placeholder", "call_module") or n.is_impure():
            live.add(n)
            live.update(n.all_input_nodes)
    return live


def _bar(items: list, desc: str, progress: Progress) -> Iterator:
    return iter(progress_bar(items, desc=desc, unit="batch", progress=progress, leave=False))
