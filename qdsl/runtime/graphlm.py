"""Run a captured (and possibly quantized) generate-mode graph as a ``CausalLM``.

The generate-mode graph is a ``torch.export`` of the model with a static
key/value cache of ``max_cache_len`` positions, dynamic sequence length. Batch 1:
``gm(input_ids=[1, T], cache_position=[T]) -> logits [1, T, V]``. Positions past
the current one are masked, so a new sequence simply starts writing at position 0
again.

A graph captured with ``batch_size`` B > 1 (``qdsl.graph.capture``) runs B
left-padded rows per forward (``greedy_batch``, ``qdsl.models.batching``):
``gm(input_ids=[B, T], attention_mask=[B, L], position_ids=[B, T], cache_position=[T])``.
Its rows are fixed: fewer prompts run with filler rows, a finished row keeps
running (its tokens are ignored). ``logits`` runs B sequences per forward;
``greedy`` runs one sequence in row 0 (the others repeat it: B times the work of a
batch-1 graph, so a caller decoding one sequence at a time loads batch 1).

``compile_decode`` (default: ``$QDSL_COMPILE_DECODE``, else off): one-token forwards
run through ``qdsl.runtime.fused.decode_step``: one C++ call a step
(``llama_decode_step``) where the graph is a w8a8 LLaMA step and checks out against the
graph, else ``qdsl.runtime.compiled.CompiledStep`` (inductor, static shapes, eager
fallback); prefill stays eager.

A prefill that only needs the last position's logits (greedy decoding) runs a copy of
the graph whose final float ``linear`` (the head) reads the last position only
(``last_position_graph``), as transformers' ``logits_to_keep=1`` does for the float
model: the head is ~21% of a SmolLM2 prefill's multiply-adds (vocabulary 49,152 x 576).
"""

from __future__ import annotations

import torch
from torch import fx

from ..models.batching import BatchGreedyMixin, positions
from ..models.lm import GreedyMixin
from . import compiled, fused


def last_position_graph(gm: torch.nn.Module) -> fx.GraphModule | None:
    """A graph computing ``gm``'s logits at the last position only (``[B, 1, V]``), or
    None where that cannot be done safely: the output must be (a tuple starting with)
    a float ``aten.linear`` (the head), whose input is then sliced to ``[:, -1:]``. A
    linear is per position, so the logits of that position are the full graph's (up to
    the GEMM's summation order for one row instead of T); anything the head's input
    went through (norms, quantizers, per-tensor ones included) still sees every
    position. The copy shares ``gm``'s modules and tensors."""
    if not isinstance(gm, fx.GraphModule):
        return None
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen      # an export's calling convention (kwargs in)
    out = graph.graph_copy(gm.graph, {})    # the output's value, nodes mapped
    head = out[0] if isinstance(out, (tuple, list)) and out else out
    if not (isinstance(head, fx.Node) and head.op == "call_function"
            and head.target is torch.ops.aten.linear.default):
        return None
    x = head.args[0]
    with graph.inserting_before(head):
        last = graph.call_function(torch.ops.aten.slice.Tensor, (x, 1, -1, 2 ** 62))
    head.replace_input_with(x, last)
    graph.output(out)
    return fx.GraphModule(gm, graph)


class GraphLM(GreedyMixin, BatchGreedyMixin):
    def __init__(self, gm: torch.nn.Module, max_cache_len: int, name: str = "graph",
                 batch_size: int = 1, compile_decode: bool | None = None):
        self.gm, self.max_cache_len, self.name = gm, max_cache_len, name
        self.batch_size = batch_size
        on = compiled.wanted(False) if compile_decode is None else compile_decode
        self.step = fused.decode_step(gm, name) if on else None
        self._pos = 0
        self._mask = self._next = None
        self._last: list = []      # [last_position_graph(gm)], built on first use

    def _check_room(self, tokens: int) -> None:
        if tokens > self.max_cache_len - 1:
            raise ValueError(f"sequence of {tokens} tokens exceeds the graph's cache of "
                             f"{self.max_cache_len - 1}; truncate the context")

    def _run(self, ids: torch.Tensor, start: int, last: bool = False) -> torch.Tensor:
        # ids: [1, T]; returns logits [1, T, V] ([1, 1, V] when `last` and the graph allows)
        t = ids.shape[1]
        self._check_room(start + t)
        pos = torch.arange(start, start + t, dtype=torch.long)
        gm = self._graph(t, last)
        if self.batch_size == 1:
            return gm(input_ids=ids, cache_position=pos)
        rows = self.batch_size   # one sequence, repeated in every row: no pads
        mask = torch.zeros(rows, self.max_cache_len, dtype=torch.long)
        mask[:, :start + t] = 1
        return gm(input_ids=ids.expand(rows, -1), attention_mask=mask,
                  position_ids=pos.expand(rows, -1), cache_position=pos)[:1]

    def _graph(self, tokens: int, last: bool = False):
        """The callable a forward of ``tokens`` positions runs: the compiled step for one;
        ``last`` (only the last position's logits are read): the last-position graph
        where there is one."""
        if self.step is not None and tokens == 1:
            return self.step
        if last and tokens > 1:
            if not self._last:
                self._last.append(last_position_graph(self.gm))
            if self._last[0] is not None:
                return self._last[0]
        return self.gm

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        if self.batch_size == 1:
            out = [self._run(row[None], 0) for row in ids]  # one sequence per forward
        else:   # the graph's rows at a time
            out = [torch.stack(self.logits_rows(ids[i:i + self.batch_size].tolist()))
                   for i in range(0, len(ids), self.batch_size)]
        self._pos = 0
        return torch.cat(out).float()

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self._run(ids, 0, last=True)
        self._pos = ids.shape[1]
        return logits[0, -1].float()

    @torch.inference_mode()
    def decode(self, token: int) -> torch.Tensor:
        logits = self._run(torch.tensor([[token]], dtype=torch.long), self._pos)
        self._pos += 1
        return logits[0, -1].float()

    # batched decoding: the graph's B rows, left-padded, one mask column per cache slot
    def _forward_rows(self, ids: torch.Tensor, position_ids: torch.Tensor,
                      last: bool = False) -> torch.Tensor:
        t = ids.shape[1]
        self._check_room(self._pos + t)
        gm = self._graph(t, last)
        if self.batch_size == 1:   # a batch-1 graph takes no mask: only unpadded rows
            assert bool(self._mask.all()), "a batch-1 graph cannot run padded rows"
            return gm(input_ids=ids, cache_position=torch.arange(self._pos, self._pos + t))
        mask = torch.zeros(ids.shape[0], self.max_cache_len, dtype=torch.long)
        mask[:, :self._mask.shape[1]] = self._mask
        return gm(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                  cache_position=torch.arange(self._pos, self._pos + t))

    def _logits_rows(self, ids: torch.Tensor, mask: torch.Tensor,
                     last: bool = False) -> torch.Tensor:
        if ids.shape[0] != self.batch_size:   # the graph's rows are fixed
            raise ValueError(f"{ids.shape[0]} rows for a graph of {self.batch_size}")
        self._pos, self._mask = 0, mask
        logits = self._forward_rows(ids, positions(mask), last)
        self._pos = ids.shape[1]
        return logits

    @torch.inference_mode()
    def _prefill_rows(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = self._logits_rows(ids, mask, last=True)
        self._next = positions(mask)[:, -1] + 1
        return logits[:, -1].float()

    @torch.inference_mode()
    def _decode_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        assert self._mask is not None, "_decode_rows() before _prefill_rows()"
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(tokens), 1)], 1)
        logits = self._forward_rows(tokens[:, None], self._next[:, None])
        self._pos, self._next = self._pos + 1, self._next + 1
        return logits[:, -1].float()
