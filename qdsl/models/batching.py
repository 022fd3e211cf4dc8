"""Batched greedy decoding: several prompts per forward, left-padded, with a key/value
cache (what ``qdsl eval --batch-size`` runs).

Prompts of different lengths are left-padded to the longest, so every row's last
prompt token sits in the same column and each decode step appends one column to all
rows. Row ``r`` carries an attention mask (0 on its pads) and its own positions
(``0 .. len - 1`` on its tokens, counted from its first real token), so each row's
tokens see exactly the keys and positions they would see alone: the logits equal
batch size 1 up to float summation order (a different matrix shape can sum in
another order).

A row stops on the same rule as ``GreedyMixin.greedy`` (``max_new_tokens`` or its
``stop``); a stopped row is dropped from the forward where the model's cache can drop
rows (``_drop_rows``), else it rides along and its tokens are ignored.
"""

from __future__ import annotations

from typing import Callable

import torch

# qdsl.models.lm.StopFn (lm imports this module): called with one row's tokens so far
StopFn = Callable[[list[int]], bool]


def left_pad(prompts: list[list[int]], rows: int | None = None, pad_id: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [R, T], mask [R, T]): the prompts left-padded to the longest, T = its
    length. ``rows`` > len(prompts): the extra rows repeat the first prompt (a model
    with a fixed batch runs them; their outputs are ignored). Mask 1 on tokens, 0 on pads."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("left_pad: every prompt needs at least one token")
    rows = max(rows or len(prompts), len(prompts))
    full = list(prompts) + [prompts[0]] * (rows - len(prompts))
    t = max(len(p) for p in full)
    ids = torch.full((rows, t), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, t), dtype=torch.long)
    for r, p in enumerate(full):
        ids[r, t - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, t - len(p):] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Each column's position in its row: tokens 0, 1, ...; pads 0 (they are masked)."""
    return (mask.cumsum(1) - 1).clamp_min(0)


class BatchGreedyMixin:
    """``greedy_batch`` in terms of ``_prefill_rows`` and ``_decode_rows``.

    ``batch_size``: the most rows one forward takes (None: any). A subclass implements
    ``_logits_rows(ids [R, T], mask [R, T]) -> logits [R, T, V]`` (no cache kept),
    ``_prefill_rows(ids [R, T], mask [R, T]) -> logits [R, V]`` (last column; starts
    new sequences) and ``_decode_rows(tokens [R]) -> logits [R, V]`` (one column more),
    and may implement ``_drop_rows(keep: list[int])`` to shrink its cache to the
    ``keep`` rows (returns False where it cannot).
    """

    batch_size: int | None = None

    @torch.inference_mode()
    def logits_rows(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        """Logits [len(s), V] (float32) of each of up to ``batch_size`` token sequences,
        run left-padded in one forward (no cache kept)."""
        if self.batch_size is not None and len(seqs) > self.batch_size:
            raise ValueError(f"{len(seqs)} sequences exceed the model's batch of "
                             f"{self.batch_size}")
        ids, mask = left_pad(seqs, self.batch_size)
        logits = self._logits_rows(ids, mask)
        t = ids.shape[1]
        return [logits[r, t - len(s):].float() for r, s in enumerate(seqs)]

    def _drop_rows(self, keep: list[int]) -> bool:
        return False

    @torch.inference_mode()
    def greedy_batch(self, prompts: list[list[int]], max_new_tokens: int,
                     stop: StopFn | None = None) -> list[list[int]]:
        """Greedy continuations (token ids, without the prompts) of up to
        ``batch_size`` prompts; row r equals ``greedy(prompts[r], ...)`` (same stop
        rule: ``max_new_tokens`` or ``stop(out)``) up to float summation order."""
        if self.batch_size is not None and len(prompts) > self.batch_size:
            raise ValueError(f"{len(prompts)} prompts exceed the model's batch of "
                             f"{self.batch_size}")
        outs: list[list[int]] = [[] for _ in prompts]
        if max_new_tokens <= 0 or not prompts:
            return outs
        ids, mask = left_pad(prompts, self.batch_size)
        logits = self._prefill_rows(ids, mask)
        rows = list(range(len(prompts)))       # the prompt each forward row carries
        rows += [-1] * (ids.shape[0] - len(rows))   # filler rows (fixed batch)
        while True:
            tokens = logits.argmax(-1)
            for i, r in enumerate(rows):
                if r >= 0:
                    outs[r].append(int(tokens[i]))
            live = [i for i, r in enumerate(rows) if r >= 0 and not (
                len(outs[r]) >= max_new_tokens or (stop is not None and stop(outs[r])))]
            if not live:
                return outs
            if len(live) < len(rows) and self._drop_rows(live):
                rows, tokens = [rows[i] for i in live], tokens[live]
            else:
                rows = [r if i in live else -1 for i, r in enumerate(rows)]
            logits = self._decode_rows(tokens)
