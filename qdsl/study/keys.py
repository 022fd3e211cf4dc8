"""Cache keys of a sweep's jobs: what each job's result depends on (docs/results.md,
"Cache key"). Kept apart from the driver (``qdsl.study.sweep``) so that a worker
(``qdsl.study.sweepjob``) can name another sweep's entry: the one ``--grow-from``
grows."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

from ..lang import load_recipe
from .jobs import HUMANEVAL, QUALITY, ROBUST, Job, SweepConfig, effective_settings, eval_batch, \
    prompt_mode

FORMAT = 1  # bump when a job's computation changes meaning: old cache entries are ignored


def bench_hash(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.id, s.context, s.target]).encode())
    return h.hexdigest()[:16]


def grown_key(job: Job, cfg: SweepConfig, model_hash: str, samples) -> str:
    """The cache key of ``job`` in the sweep at ``cfg.grow_from`` samples that a
    ``--grow-from`` run grows (its bench: the first max(grow_from, ppl_windows) of the
    same prefix-stable draw)."""
    small = replace(cfg, n=cfg.grow_from, grow_from=None)
    return job_key(job, small, model_hash,
                   bench_hash(samples[:max(small.n, small.ppl_windows)]))


def job_key(job: Job, cfg: SweepConfig, model_hash: str, bhash: str) -> str:
    """The cache key of ``job``: what its result depends on. A HumanEval job's does not
    hold the line-completion benchmark and its settings (samples, prompt budget,
    perplexity windows, layer statistics), which it never reads: its pass@1 is reused
    by sweeps of the same model at another ``--n`` or ``--ppl-windows``."""
    if job.kind == HUMANEVAL:
        payload: dict = {"format": FORMAT, "kind": job.kind, "model": model_hash,
                         "prompt": prompt_mode(cfg)}
    else:
        payload = {"format": FORMAT, "kind": job.kind, "model": model_hash, "bench": bhash,
                   "eval": [cfg.ctx_tokens, cfg.max_new_tokens, prompt_mode(cfg),
                            cfg.ppl_windows], "layers": [cfg.layer_windows, cfg.layer_tokens]}
    if job.recipe is not None:
        r = load_recipe(job.recipe)
        payload.update(recipe=r.hash(), settings=effective_settings(r, cfg, job.lower,
                                                                   job.own_calib).to_json())
    if job.kind == QUALITY and cfg.grow_from is not None:
        # a grown entry's first grow_from samples ran in the smaller run's batches: it is
        # not what a run from scratch at n computes
        payload["grown_from"] = cfg.grow_from
    if job.kind == ROBUST:
        payload["perturb"] = [cfg.perturb_prob, cfg.perturb_seed]
    if job.kind == HUMANEVAL:
        payload["humaneval"] = [cfg.humaneval, cfg.humaneval_tokens]
    if job.recipe is not None and eval_batch(cfg, job) > 1:
        # a compiled row's completions change with the batch (float summation order flips
        # near-tied greedy choices: docs/performance.md); the float model's do not, and
        # batch 1 keeps the keys older caches were written under
        payload["batch"] = eval_batch(cfg, job)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
