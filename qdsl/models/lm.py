"""The one interface evaluation and benchmarking use to run a causal language
model, whatever it is: a float transformers model, or a qdsl-compiled graph.

Everything that scores or times a model (``qdsl eval``, ``qdsl bench``,
``qdsl sweep``) takes a ``CausalLM``; it never looks inside.
"""

from __future__ import annotations

import inspect
from typing import Callable, Protocol, runtime_checkable

import torch

from .batching import BatchGreedyMixin, positions

StopFn = Callable[[list[int]], bool]  # called with the tokens generated so far


@runtime_checkable
class CausalLM(Protocol):
    """A batch-1 causal LM with a key/value cache.

    * ``logits(ids)``: ids [1, T] -> logits [1, T, V] (float32), no cache kept.
    * ``prefill(ids)``: start a new sequence; ids [1, T] -> logits of the last
      position [V]; keeps the key/value cache for ``decode``.
    * ``decode(token)``: append one token to the cached sequence -> logits [V].
    * ``greedy(ids, max_new_tokens, stop)``: greedy continuation (token ids,
      without the prompt); each new token costs one ``decode`` step.

    A model may also decode several prompts per forward (``qdsl.models.batching``):
    ``greedy_batch(prompts, max_new_tokens, stop)`` for up to ``batch_size`` prompts
    (None: any number); ``qdsl eval`` uses it where present.
    """

    name: str

    def logits(self, ids: torch.Tensor) -> torch.Tensor: ...

    def prefill(self, ids: torch.Tensor) -> torch.Tensor: ...

    def decode(self, token: int) -> torch.Tensor: ...

    def greedy(self, ids: torch.Tensor, max_new_tokens: int,
               stop: StopFn | None = None) -> list[int]: ...


class GreedyMixin:
    """``greedy`` in terms of ``prefill`` and ``decode``."""

    @torch.inference_mode()
    def greedy(self, ids: torch.Tensor, max_new_tokens: int,
               stop: StopFn | None = None) -> list[int]:
        out: list[int] = []
        if max_new_tokens <= 0:
            return out
        logits = self.prefill(ids)
        while True:
            tok = int(logits.argmax())
            out.append(tok)
            if len(out) >= max_new_tokens or (stop is not None and stop(out)):
                return out
            logits = self.decode(tok)


class HFCausalLM(GreedyMixin, BatchGreedyMixin):
    """A transformers causal LM (float, or with swapped modules) with its own DynamicCache.
    Batched decoding takes any number of rows and drops finished ones from the cache."""

    def __init__(self, model: torch.nn.Module, name: str = "model"):
        self.model = model.eval()
        self.name = name
        self._past = None
        self._pos = 0
        # transformers 5.24 renamed past_key_values to cache (the old name warns)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def _cache_of(self, out):
        return out["cache"] if "cache" in out else out["past_key_values"]

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits.float()

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, use_cache=True)
        self._past, self._pos = self._cache_of(out), ids.shape[1]
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def decode(self, token: int) -> torch.Tensor:
        assert self._past is not None, "decode() before prefill()"
        ids = torch.tensor([[token]], dtype=torch.long)
        out = self.model(input_ids=ids, use_cache=True, **{self._cache_kw: self._past})
        self._past, self._pos = self._cache_of(out), self._pos + 1
        return out.logits[0, -1].float()

    # batched decoding (qdsl.models.batching): left-padded rows, a mask and positions per row
    def _logits_rows(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                          use_cache=False).logits

    @torch.inference_mode()
    def _prefill_rows(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = positions(mask)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         logits_to_keep=1)
        self._past, self._mask, self._next = self._cache_of(out), mask, pos[:, -1] + 1
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def _decode_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        assert self._past is not None, "_decode_rows() before _prefill_rows()"
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(tokens), 1)], 1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self._mask,
                         position_ids=self._next[:, None], use_cache=True,
                         **{self._cache_kw: self._past})
        self._past, self._next = self._cache_of(out), self._next + 1
        return out.logits[:, -1].float()

    def _drop_rows(self, keep: list[int]) -> bool:
        select = getattr(self._past, "batch_select_indices", None)
        if select is None:
            return False
        idx = torch.tensor(keep, dtype=torch.long)
        select(idx)
        self._mask, self._next = self._mask[idx], self._next[idx]
        return True
