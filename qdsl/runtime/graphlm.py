"""Run a captured (and possibly quantized) generate-mode graph as a ``CausalLM``.

The generate-mode graph is a ``torch.export`` of the model with a static
key/value cache of ``max_cache_len`` positions, batch 1, dynamic sequence
length: ``gm(input_ids=[1, T], cache_position=[T]) -> logits [1, T, V]``.
Positions past the current one are masked, so a new sequence simply starts
writing at position 0 again.
"""

from __future__ import annotations

import torch

from ..models.lm import GreedyMixin


class GraphLM(GreedyMixin):
    def __init__(self, gm: torch.nn.Module, max_cache_len: int, name: str = "graph"):
        self.gm, self.max_cache_len, self.name = gm, max_cache_len, name
        self._pos = 0

    def _run(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        # ids: [1, T]; returns logits [1, T, V]
        t = ids.shape[1]
        if start + t > self.max_cache_len - 1:
            raise ValueError(f"sequence of {start + t} tokens exceeds the graph's cache of "
                             f"{self.max_cache_len - 1}; truncate the context")
        pos = torch.arange(start, start + t, dtype=torch.long)
        return self.gm(input_ids=ids, cache_position=pos)

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        out = [self._run(row[None], 0) for row in ids]  # the cache is batch 1
        self._pos = 0
        return torch.cat(out).float()

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self._run(ids, 0)
        self._pos = ids.shape[1]
        return logits[0, -1].float()

    @torch.inference_mode()
    def decode(self, token: int) -> torch.Tensor:
        logits = self._run(torch.tensor([[token]], dtype=torch.long), self._pos)
        self._pos += 1
        return logits[0, -1].float()
