"""One ``qdsl sweep`` job, in whichever process runs it: compile the recipe (or reload
its saved artifact), evaluate, measure, and cache the result atomically.

Kinds (``qdsl.study.jobs.Job``): ``quality`` compiles, saves the artifact and measures line
completion, perplexity, storage and per-layer statistics (``int8`` lowerings also the
artifact's real size and ``qdsl bench``); ``robust`` and ``humaneval`` reload that
artifact (HumanEval re-captured with a cache long enough for its prompts) and score
the perturbed benchmark or HumanEval pass@1. A model is loaded once per process.

What imports torch (the model, the evaluations, the compiler) is imported inside the
functions that run a job: every qdsl command imports this module (its parser reads
``SweepConfig`` through ``qdsl.study.sweep``), and most never run a job.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import qdsl

from ..atomic import finite
from ..errors import QdslError
from ..eval.checkpoint import CompletionCheckpoint
from ..lang import load_recipe
from ..models.limits import positions_of_config
from ..models.zoo import load_model, resolve_model
from ..progress import Progress
from .jobs import (HUMANEVAL, QUALITY, ROBUST, Job, LoadedModel, SweepConfig, cache_len,
                   effective_settings, eval_batch, fit, prompt_mode)
from .keys import grown_key
from .layerstats import float_reference, layer_stats, layer_windows
from .sweepcache import BadEntry, CacheStore
from .tables import describe_bits, storage

# a running quality or HumanEval job's completions so far, DIR/partial/<key>.json (and
# its calibration's state, DIR/partial/<key>.calib.safetensors, while it calibrates)
# (qdsl.eval.checkpoint)
PARTIAL = "partial"

log = logging.getLogger(__name__)

_LOADED: dict = {}   # model name -> LoadedModel; one per process (the last one loaded)


def _model(name: str) -> LoadedModel:
    """The model ``name``, loaded once per process; loading another drops the previous
    one (and the float statistics measured on it)."""
    if name not in _LOADED:
        _LOADED.clear()
        model, tok = load_model(name, require_causal=True)
        _LOADED[name] = LoadedModel(name, model, tok, positions_of_config(model.config))
    return _LOADED[name]


def _int8_available() -> bool:
    return importlib.util.find_spec("qdsl.passes.lower_int8") is not None


def _humaneval_cache_len(cfg: SweepConfig, tok, max_pos: int | None) -> int:
    """Static cache for HumanEval: the longest prompt of the first ``cfg.humaneval``
    problems plus the new tokens (``generate`` left-cuts what still does not fit)."""
    from ..eval.humaneval import load_problems

    longest = max(len(tok(p["prompt"], add_special_tokens=False)["input_ids"])
                  for p in load_problems()[:cfg.humaneval])
    return fit(longest + cfg.humaneval_tokens + 2, max_pos)


def _compile(recipe, cfg: SweepConfig, job: Job, out: dict, progress: Progress,
             graph_cache: int | None = None, calib_checkpoint=None):
    loaded = _model(cfg.model)
    model, tok = loaded.model, loaded.tok
    graph_cache = graph_cache or cache_len(cfg, loaded.max_pos)
    st = effective_settings(recipe, cfg, job.lower, job.own_calib)
    lower = st.lower or "fake"
    if lower == "int8" and not _int8_available():
        out["bench"] = {"skipped": "int8 lowering not available (qdsl.passes.lower_int8 "
                                   "missing): compiled as fake-quant"}
        lower = "fake"
    # calibration windows must fit the graph's cache (stdlib-gpt2: 256 positions)
    st = replace(st, calib_seq_len=min(st.calib_seq_len or 256, graph_cache - 1))
    t = time.time()
    qm = qdsl.compile(model, recipe, tokenizer=tok, settings=st, lower=lower,
                      max_cache_len=graph_cache, fallback="simulate",
                      progress=progress, calib_checkpoint=calib_checkpoint)
    out.update(compile_seconds=round(time.time() - t, 2), lower=lower,
               calib_samples=st.calib_samples, settings=st.to_json(),
               fallbacks=len(getattr(qm, "fallbacks", None) or ()))
    return qm


def run_job(job: Job, cfg: SweepConfig, samples, out_dir: Path, *, progress: Progress = False,
            artifact: Path | None = None, partial: Path | None = None,
            key: str | None = None, grow: dict | None = None) -> dict:
    """Run one job -> its result dict (the caller caches it). ``artifact``: where the
    recipe's compiled model is saved (quality job) or reloaded from (robust and
    HumanEval jobs). ``partial``: a quality job's completions and perplexity windows
    are saved there as they finish and read back by the next run of the job (``key``,
    its cache key) when that run would compute them unchanged
    (``qdsl.eval.checkpoint``); the saved artifact is then reloaded instead of
    calibrating again, when it is still there.
    ``grow``: the finished entry of this job at ``cfg.grow_from`` samples, which this
    run grows to ``cfg.n`` (``_grown``)."""
    from ..eval.complete import CompletionConfig, evaluate
    from ..models.lm import HFCausalLM

    t0 = time.time()
    pool, samples = samples, samples[:cfg.n]   # the sweep draws max(n, ppl_windows)
    loaded = _model(cfg.model)
    model, tok = loaded.model, loaded.tok
    he_cache = (_humaneval_cache_len(cfg, tok, loaded.max_pos) if job.kind == HUMANEVAL
                else None)
    max_pos = (he_cache or cache_len(cfg, loaded.max_pos)) - 1  # what graphs run; float too
    ccfg = CompletionConfig(cfg.ctx_tokens, cfg.max_new_tokens, prompt_mode(cfg))
    out: dict = {"kind": job.kind, "recipe": job.recipe, "model": cfg.model,
                 "numerics": qdsl.NUMERICS}
    qm = batched = None
    rows = eval_batch(cfg, job)
    ck = (CompletionCheckpoint(Path(partial), {})
          if partial is not None and job.kind in (QUALITY, HUMANEVAL) else None)
    if grow is not None:
        return _grown(job, cfg, samples, grow, loaded, ccfg, max_pos, rows, ck, key,
                      progress, t0)
    if job.recipe is None:
        lm = HFCausalLM(model, cfg.model)
        out.update(bits="fp32", lower="float")
    else:
        recipe = load_recipe(job.recipe)
        out["recipe_hash"] = recipe.hash()
        qm = _reload(artifact, model, he_cache, rows) if job.kind != QUALITY else None
        one_row = qm is None   # compiled or reloaded here with one row
        saved = ck.saved_extra() if ck is not None else None
        if qm is None and saved and saved.get("params") == _params_hash(artifact):
            # an interrupted run of this job saved this artifact: no second calibration
            qm = _reload(artifact, model)
            if qm is not None:
                out.update(saved.get("compile") or {})
                out["artifact"] = str(artifact)
        if qm is None:  # HumanEval compiles with its longer cache (slower calibration)
            # a long calibration saves its state beside the job's completions and resumes
            calib_ck = ((partial.with_suffix(".calib.safetensors"), key or "")
                        if partial is not None else None)
            qm = _compile(recipe, cfg, job, out, progress, he_cache, calib_ck)
            if artifact is not None and job.kind != HUMANEVAL:
                qm.save(artifact, force=True)
                out["artifact"] = str(artifact)
            elif job.kind == HUMANEVAL:
                ck = None   # a model no file holds: its completions cannot be resumed
        if one_row and rows > 1:
            # batched: the saved artifact again, its graph captured with `rows` rows (qm,
            # one row, still measures the layers); 1 where it cannot batch (a warning)
            batched = _reload(artifact, model, batch_size=rows)
        lm = (batched or qm).lm(name=Path(job.recipe).stem)
        rows = lm.batch_size
        out["bits"] = describe_bits(qm.plan)
    out["batch_size"] = rows
    if ck is not None:
        import torch

        # what a saved prediction depends on: the job, the batches' rows, the compiled
        # model's parameters, and the CPU kernels' float summation order
        params = _params_hash(artifact) if job.recipe is not None else None
        ck.header = {"key": key, "rows": rows, "params": params,
                     "cpu": torch.backends.cpu.get_cpu_capability(),
                     "torch": torch.__version__, "numerics": qdsl.NUMERICS}
        ck.extra = {"params": params,
                    "compile": {k: out[k] for k in ("compile_seconds", "lower", "calib_samples",
                                                    "settings", "fallbacks") if k in out}}
    if job.kind == HUMANEVAL:
        from ..eval.humaneval import run_humaneval

        he = run_humaneval(lm, tok, cfg.humaneval, cfg.humaneval_tokens,
                           heal=ccfg.prompt == "heal", max_positions=max_pos,
                           progress=progress, unsafe=cfg.unsafe_exec, checkpoint=ck,
                           batch_size=rows)
        resumed = he.pop("resumed", None)
        if resumed:
            out["resumed_problems"] = resumed
        out["humaneval"] = he
    elif job.kind == ROBUST:
        from ..eval.robust import robust_scores

        out["robust"] = robust_scores(lm, tok, samples, ccfg, max_positions=max_pos,
                                      prob=cfg.perturb_prob, seed=cfg.perturb_seed,
                                      progress=progress, batch_size=rows)
    else:
        t = time.time()
        res = evaluate(lm, tok, samples, ccfg, max_positions=max_pos,
                       ppl_windows=cfg.ppl_windows, progress=progress, batch_size=rows,
                       ppl_samples=pool, checkpoint=ck)
        out.update({k: res.get(k) for k in ("n", "em", "es", "ppl", "bpb", "ppl_windows",
                                             "ppl_window_nll", "ppl_window_tokens",
                                             "execution")})
        if res.get("resumed"):
            out["resumed_samples"] = res["resumed"]
        if res.get("ppl_resumed"):
            out["resumed_windows"] = res["ppl_resumed"]
        out["eval_seconds"] = round(time.time() - t, 2)
        # the completions' own time (a resumed job's includes the earlier run's), apart
        # from perplexity's: what a larger n would cost (qdsl.study.precision)
        out.update(complete_seconds=res["complete_seconds"], complete_n=res["n"],
                   ppl_seconds=res.get("ppl_seconds"))
        out["samples"] = [{k: r[k] for k in ("id", "pred", "em", "es")} for r in res["samples"]]
        _sizes(qm, model, out, job, cfg, out_dir)
        windows = layer_windows(tok, samples, cfg)   # only quality jobs measure layers
        if windows:
            t = time.time()
            if qm is None:
                ref = float_reference(cfg, windows, loaded)
                out["layers"] = {n: {"max_abs_windows": ref["max_abs"][n]} for n in ref["names"]}
            elif qm.lower == "fake":  # int8 lowering replaced the named nodes
                out["layers"] = layer_stats(qm, cfg, windows, loaded)
            out["layer_seconds"] = round(time.time() - t, 2)
    out["seconds"] = round(time.time() - t0, 2)
    del qm, batched, lm
    gc.collect()
    return out


def _sizes(qm, model, out: dict, job: Job, cfg: SweepConfig, out_dir: Path) -> None:
    """Estimated parameter storage; int8 lowerings: the artifact's real size and bench."""
    if qm is None:
        n = sum(p.numel() for p in model.parameters() if p.is_floating_point())
        out.update(size_before=n * 4, size_after=n * 4, size_mb=n * 4 / 1e6, compression=1.0,
                   body_compression=1.0)
        return
    st = storage(model, qm.named, qm.plan)
    out.update(size_before=st.before, size_after=st.after, size_mb=st.after / 1e6,
               compression=st.compression, body_before=st.body_before,
               body_after=st.body_after, body_compression=st.body_compression)
    if qm.lower == "int8":
        from ..artifact.store import artifact_size

        art = Path(out.get("artifact") or out_dir / "artifacts" / Path(job.recipe).stem)
        if "artifact" not in out:
            qm.save(art, force=True)
        out["artifact_bytes"] = artifact_size(art)
        if cfg.bench_int8:
            try:
                from ..eval.hosting import BenchConfig, run_bench

                out["bench"] = run_bench(cfg.model, artifact=str(art),
                                         cfg=BenchConfig(repeats=3, rounds=1))
            except (ImportError, QdslError) as e:
                out["bench"] = {"skipped": f"{type(e).__name__}: {e}"}


def _params_hash(artifact: Path | None) -> str | None:
    """The saved artifact's parameters and plan, as the sha256s its manifest records
    (None: no artifact there)."""
    try:
        files = json.loads((Path(artifact) / "qdsl_artifact.json").read_text())["files"]
        return ":".join(files[f]["sha256"] for f in sorted(files)
                        if f.endswith(".safetensors") or f == "plan.json")
    except (TypeError, OSError, ValueError, KeyError):
        return None


# what a grown entry keeps of the smaller run's: the model (compiled once, on the same
# calibration), its perplexity windows (the same windows: the draw is prefix-stable) and
# its storage and layer statistics
_GROWN_KEEPS = ("recipe_hash", "compile_seconds", "lower", "calib_samples", "settings",
                "fallbacks", "artifact", "bits", "ppl", "bpb", "ppl_windows", "ppl_window_nll",
                "ppl_window_tokens", "size_before", "size_after", "size_mb", "compression",
                "body_before", "body_after", "body_compression",
                "layers", "layer_seconds", "ppl_seconds")


def _grown(job: Job, cfg: SweepConfig, samples, grow: dict, loaded, ccfg, max_pos: int,
           rows: int, ck, key: str | None, progress, t0: float) -> dict:
    """``grow`` (this job's entry at ``cfg.grow_from`` samples) grown to ``cfg.n``: the
    new samples complete as their own batches (longest prompts first among themselves)
    on the smaller run's saved model, on the same CPU capability, torch and rows per
    batch (else a QdslError saying what differs); everything else is the smaller run's.
    The first ``grow_from`` completions are exactly that run's, so the result is not a
    from-scratch run at n (whose batches mix old and new samples): it has its own key."""
    import torch

    from ..eval.complete import evaluate
    from ..models.lm import HFCausalLM

    n0, where = cfg.grow_from, f"--grow-from {cfg.grow_from}"
    head = [s.id for s in samples[:n0]]
    if [x["id"] for x in grow.get("samples", [])] != head:
        raise QdslError(f"{where}: the n = {n0} entry {grow.get('key')} did not complete "
                        "this draw's first samples; run the sweep without --grow-from")
    out: dict = {"kind": job.kind, "recipe": job.recipe, "model": cfg.model,
                 "numerics": qdsl.NUMERICS}
    params = None
    if job.recipe is None:
        lm = HFCausalLM(loaded.model, cfg.model)
    else:
        art = Path(grow["artifact"]) if grow.get("artifact") else None
        qm = _reload(art, loaded.model, batch_size=rows)
        if qm is None:
            raise QdslError(f"{where}: the n = {n0} job's artifact ({art}) is not there "
                            "(artifacts are not committed): run the sweep without --grow-from")
        if qm.lower == "int8":
            raise QdslError(f"{where}: {Path(job.recipe).name} is lowered to int8, whose "
                            "qdsl bench timings belong to one run: run it without --grow-from")
        lm, params = qm.lm(name=Path(job.recipe).stem), _params_hash(art)
        rows = lm.batch_size
    # entries older than the execution record hold only their rows per batch: what
    # they do not record cannot be compared, and the grown entry says so
    was = {**(grow.get("execution") or {"batch_size": grow.get("batch_size")}),
           "numerics": grow.get("numerics")}
    now = {"batch_size": rows, "cpu": torch.backends.cpu.get_cpu_capability(),
           "torch": torch.__version__, "numerics": qdsl.NUMERICS}
    unverified = sorted(k for k in now if was.get(k) is None)
    if unverified:
        log.warning("--grow-from %d: the n = %d entry %s does not record its %s: assumed "
                    "the same as this run's", n0, n0, grow.get("key"), ", ".join(unverified))
    differ = [f"{k} {was.get(k)} -> {v}" for k, v in now.items()
              if k not in unverified and was.get(k) != v]
    if differ:
        raise QdslError(f"{where}: the n = {n0} entry ran otherwise ({', '.join(differ)}); "
                        "its completions would not be this run's: run without --grow-from "
                        "(or with the same --batch-size, CPU, torch and qdsl.NUMERICS)")
    if ck is not None:
        ck.header = {"key": key, "rows": rows, "params": params, **now, "grown_from": n0}
    t = time.time()
    new = samples[n0:cfg.n]
    res = evaluate(lm, loaded.tok, new, ccfg, max_positions=max_pos, ppl_windows=0,
                   progress=progress, batch_size=rows, checkpoint=ck)
    scored = grow["samples"] + [{k: r[k] for k in ("id", "pred", "em", "es")}
                                for r in res["samples"]]
    out.update({k: grow[k] for k in _GROWN_KEEPS if k in grow})
    out.update(n=len(scored), em=100 * sum(float(x["em"]) for x in scored) / len(scored),
               es=sum(x["es"] for x in scored) / len(scored), samples=scored,
               execution=res.get("execution"), batch_size=rows,
               eval_seconds=round(time.time() - t, 2),
               complete_seconds=res["complete_seconds"], complete_n=len(new),
               grown_from={"n": n0, "key": grow.get("key"), "new_samples": len(new),
                           **({"unverified": unverified} if unverified else {})})
    if res.get("resumed"):
        out["resumed_samples"] = res["resumed"]
    out["seconds"] = round(time.time() - t0, 2)
    del lm
    gc.collect()
    return out


def _reload(artifact: Path | None, model, graph_cache: int | None = None,
            batch_size: int = 1):
    """A quality job's compiled model, without calibrating again (None if unusable);
    ``graph_cache``: re-captured with this static cache; ``batch_size``: with this many
    rows per forward (``qdsl.load``)."""
    if artifact is None or not (Path(artifact) / "qdsl_artifact.json").exists():
        return None
    try:
        return qdsl.load(artifact, model, max_cache_len=graph_cache, batch_size=batch_size)
    except QdslError as e:
        log.warning("cannot reload %s (%s); compiling again", artifact, e)
        return None


def reset_peak_rss() -> bool:
    """Start measuring this process's peak RSS afresh (Linux: ``VmHWM`` is reset by
    writing 5 to ``/proc/self/clear_refs``); False where it cannot be reset, and the
    peak read next is the process's since it started (an upper bound)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int | None:
    """This process's peak resident set size in bytes since the last reset (None if
    this platform tells neither)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource  # Unix only
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024   # bytes on macOS, KiB on Linux


def _to_grow(job: Job, cfg: SweepConfig, samples, store: CacheStore) -> dict | None:
    """Under ``--grow-from``: the finished entry a quality job grows (a QdslError when
    there is none); None otherwise."""
    if cfg.grow_from is None or job.kind != QUALITY:
        return None
    old = grown_key(job, cfg, resolve_model(cfg.model).content_hash[:16], samples)
    try:
        entry = store.read(old, QUALITY)
    except BadEntry:
        entry = None
    if entry is None:
        raise QdslError(f"--grow-from {cfg.grow_from}: no finished n = {cfg.grow_from} entry "
                        f"of this job (key {old}) in the cache: run the sweep at --n "
                        f"{cfg.grow_from} first, or without --grow-from")
    return {**entry, "key": old}


def _worker(job: Job, cfg: SweepConfig, samples, out_dir: str, key: str, threads: int,
            progress: Progress = False, artifact: str | None = None,
            store: CacheStore | None = None, raise_errors: bool = False) -> tuple[str, dict]:
    """Run a job and cache it in ``store`` (default ``out_dir/cache``), in a pool process,
    a Ray worker or the sweep's own. A job whose entry is already in the cache (another
    worker finished it) is not run again: that entry is returned. The entry records the
    job's peak RSS (``peak_rss_bytes``; ``peak_rss_scope`` "job" when it was measured
    from the job's start, "process" when only the process's peak was available), which
    ``qdsl.study.executors`` declares as a cluster job's memory. ``raise_errors``: a
    failure is raised (a Ray task's, so that Ray retries it) instead of returned."""
    import torch

    store = store or CacheStore(Path(out_dir) / "cache")
    try:
        cached = store.read(key, job.kind)
    except BadEntry:   # unusable: the driver warned; run the job again
        cached = None
    if cached is not None:
        return key, cached
    if threads > 0:
        torch.set_num_threads(threads)
    if isinstance(progress, str):   # line mode: transformers' own bars would redraw in the log
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    exact = reset_peak_rss()
    try:
        grow = _to_grow(job, cfg, samples, store)
        partial = Path(out_dir) / PARTIAL / f"{key}.json"
        res = run_job(job, cfg, samples, Path(out_dir), progress=progress,
                      artifact=Path(artifact) if artifact else None, partial=partial,
                      key=key, grow=grow)
    except Exception as e:  # a failed job is reported, not cached, and retried next run
        if raise_errors:
            raise
        log.debug("job %s failed", job, exc_info=True)
        return key, {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                     "recipe": job.recipe, "kind": job.kind}
    res = finite({**res, "key": key, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "peak_rss_bytes": peak_rss(), "peak_rss_scope": "job" if exact else "process"})
    store.write(key, res)  # written whole (temporary, then renamed), as it is read back
    partial.unlink(missing_ok=True)   # the job's completions are in the cache now
    return key, res
