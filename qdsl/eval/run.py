"""``qdsl eval`` as a library call: load a model or compiled artifact (and its
float baseline), score both on one benchmark, report deltas.

An artifact is a directory holding ``qdsl_artifact.json``; it is run through
``qdsl.compiler.loading.load_artifact_lm`` and its baseline defaults to the model it was
compiled from (the JSON's ``model`` / ``source_model`` entry).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from ..compiler.source import local_source
from ..errors import ArtifactError, ModelError
from ..models import zoo
from ..models.limits import fit_length, limit_of, positions_of_config, tightest
from ..models.lm import CausalLM, HFCausalLM
from ..progress import Progress
from .samples import Sample
from .complete import DEFAULT_PROMPT, PROMPT_BY_MODEL, CompletionConfig, evaluate
from .humaneval import run_humaneval
from .sandbox import sandbox_kind

log = logging.getLogger(__name__)
from ..artifact.store import MARKER as ARTIFACT_FILE, is_artifact  # noqa: F401 (re-exported)


def artifact_source(path: str | os.PathLike) -> str:
    """The model an artifact was compiled from, as recorded in its JSON."""
    try:
        meta = json.loads((Path(path) / ARTIFACT_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable {ARTIFACT_FILE}: {e}") from e
    for key in ("model", "source_model", "base_model"):
        v = meta.get(key)
        if isinstance(v, dict):
            v = v.get("id") or v.get("name") or v.get("path")
        if isinstance(v, str) and v:
            return v
    raise ArtifactError(f"{path}: {ARTIFACT_FILE} does not name its source model")


def load_lm(name_or_path: str, *, verify: bool = True, source: str | None = None,
            batch_size: int = 1) -> tuple[CausalLM, object, int | None, str]:
    """A model or artifact -> (CausalLM, tokenizer, max positions, short name for defaults).
    An artifact: ``verify`` as in ``qdsl.load``; ``source``: the model a fake-quant
    artifact runs on (default: the one it records, if on this machine; never fetched);
    ``batch_size``: the rows its graph runs per forward (``qdsl.load``; 1 with a
    warning where it cannot batch). A float model batches any number of rows."""
    if is_artifact(name_or_path):
        try:
            from ..compiler.loading import load_artifact_lm
        except ImportError as e:
            raise ModelError("compiled artifacts need qdsl compile (not available in this build)") from e

        recorded = artifact_source(name_or_path)
        own = Path(name_or_path) / "model"          # the source's config + tokenizer, if saved
        model = None
        if not (own / "config.json").is_file():
            model = source or local_source(recorded, name_or_path)
            own = zoo.resolve_model(model).path
        lm = load_artifact_lm(name_or_path, model, verify=verify, batch_size=batch_size)
        tok = AutoTokenizer.from_pretrained(own, local_files_only=True)
        config = AutoConfig.from_pretrained(own, local_files_only=True)
        return lm, tok, positions_of_config(config), recorded.lower()
    model, tok = zoo.load_model(name_or_path, require_causal=True)   # an encoder: ModelError
    name = str(name_or_path)
    return HFCausalLM(model, name), tok, positions_of_config(model.config), name.lower()


DEFAULT_CTX_TOKENS = 256
# samples per forward (qdsl eval --batch-size) for a float model and an artifact alike
# (docs/performance.md, SmolLM2-135M, 1 thread: batch 8 is 1.36x the one-sample loop on
# the float model, 3.74x on the int8 artifact, 1.38x on a fake-quant one since session
# 38 fused its attention); an artifact that cannot batch (``batch_blocker``): 1
DEFAULT_BATCH_SIZE = 8


def default_batch_size(name: str) -> int:
    """``--batch-size`` left out: DEFAULT_BATCH_SIZE, or 1 (quietly: nobody asked for
    more) for an artifact whose plan cannot batch (``compiler.loading.batch_blocker``)."""
    if is_artifact(name):
        try:
            from ..compiler.loading import batch_blocker
        except ImportError:     # no compiler in this build: the load says so
            return 1
        return 1 if batch_blocker(name) else DEFAULT_BATCH_SIZE
    return DEFAULT_BATCH_SIZE


def fit_eval(target: str, baseline: str | None = None, ctx_tokens: int | None = None,
             max_new_tokens: int = 48) -> tuple[int, int | None]:
    """(prompt budget, max positions) that fit both ``target`` and ``baseline``, read
    from their config files before either is loaded. ``ctx_tokens`` None: 256 clipped
    (with a warning) to the tighter of the two; a given value that does not fit, or
    ``max_new_tokens`` leaving no room for a prompt, is an ``OptionError``. Both models
    get the same limit, so their windows and prompts are the same tokens."""
    if baseline is None and is_artifact(target):
        baseline = local_source(artifact_source(target), target)
    limit = tightest(*(limit_of(n) for n in (target, baseline) if n is not None))
    fit_length("--max-new-tokens", max_new_tokens, max_new_tokens, limit,
               reserve=1, reserved_for="the prompt")
    ctx = fit_length("--ctx-tokens", ctx_tokens, DEFAULT_CTX_TOKENS, limit)
    return ctx, (limit.tokens if limit else None)


def run_eval(target: str, samples: list[Sample], *, bench: str, baseline: str | None = None,
             ctx_tokens: int | None = None, max_new_tokens: int = 48, prompt: str | None = None,
             ppl_windows: int = 64, humaneval: int = 0, unsafe_exec: bool = False,
             progress: Progress = True, verify: bool = True,
             batch_size: int | None = None, compare: bool = True,
             ppl_samples: list[Sample] | None = None) -> dict:
    """Evaluate ``target`` (and ``baseline``; for an artifact, its source model by
    default) -> {"target": {...}, "baseline": {...} | None, "delta": {...}}.
    ``compare`` False: the baseline is not evaluated (``"baseline"`` None), though the
    prompt budget is still fitted to it, so rows of several runs pair.
    ``ctx_tokens`` None: 256 clipped to what both run (``fit_eval``). With
    ``humaneval``, a missing sandbox is a ``SandboxError`` before any model is loaded
    unless ``unsafe_exec``. ``batch_size``: completions and perplexity windows per
    forward (``evaluate``; None: ``default_batch_size`` per model), HumanEval problems
    likewise (``run_humaneval``). ``ppl_samples``: the samples perplexity's windows come
    from (``evaluate``; default ``samples``)."""
    t0 = time.time()
    if humaneval:
        sandbox_kind(unsafe_exec)
    source = baseline  # a fake-quant artifact runs on the model it names, or on this one
    if baseline is None and is_artifact(target):
        baseline = local_source(artifact_source(target), target)
    ctx_tokens, limit = fit_eval(target, baseline, ctx_tokens, max_new_tokens)
    if not compare:
        baseline = None
    out: dict = {"bench": bench, "n": len(samples)}
    for role, name in (("target", target), ("baseline", baseline)):
        if name is None:
            out[role] = None
            continue
        t = time.time()
        rows = default_batch_size(name) if batch_size is None else batch_size
        lm, tok, max_pos, short = load_lm(name, verify=verify, batch_size=rows,
                                          source=source if role == "target" else None)
        max_pos = limit or max_pos   # what both run: an artifact's cache, the positions
        load_s = time.time() - t
        cfg = CompletionConfig(ctx_tokens, max_new_tokens,
                               prompt or PROMPT_BY_MODEL.get(short, DEFAULT_PROMPT))
        res = evaluate(lm, tok, samples, cfg, max_positions=max_pos,
                       ppl_windows=ppl_windows, progress=progress, batch_size=rows,
                       ppl_samples=ppl_samples)
        res.update(model=name, load_seconds=round(load_s, 2))
        if humaneval:
            res["humaneval"] = run_humaneval(lm, tok, limit=humaneval,
                                             heal=cfg.prompt == "heal", max_positions=max_pos,
                                             progress=progress, unsafe=unsafe_exec,
                                             batch_size=rows)
        out[role] = res
    if out["baseline"]:
        keys = ("em", "es", "ppl", "bpb")
        out["delta"] = {k: out["target"][k] - out["baseline"][k] for k in keys
                        if k in out["target"] and k in out["baseline"]}
        if "humaneval" in out["target"] and "humaneval" in out["baseline"]:
            out["delta"]["pass@1"] = (out["target"]["humaneval"]["pass@1"]
                                      - out["baseline"]["humaneval"]["pass@1"])
    out["seconds"] = round(time.time() - t0, 2)
    return out
