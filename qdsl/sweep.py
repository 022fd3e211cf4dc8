"""``qdsl sweep``: compile + evaluate many recipes on one model and benchmark, cached.

A sweep is a list of jobs. A job is one recipe (or the float baseline) and a kind:
``quality`` (compile, line completion EM / ES, perplexity, storage estimate,
per-layer activation statistics; ``int8`` lowerings also the real artifact size
and ``qdsl bench``), ``robust`` (the same model on contexts whose comments and
docstrings are perturbed, ``qdsl.robust``) or ``humaneval`` (HumanEval pass@1 for
the tables whose paper reports it, with ``SweepConfig.humaneval`` > 0). Robust and
HumanEval jobs reload the quality job's saved artifact instead of calibrating again.

Each finished job is written atomically to ``DIR/cache/<key>.json``, key = sha256 of
(kind, recipe meaning hash, effective calibration settings, model content hash,
benchmark content hash, evaluation settings, ``FORMAT``). A re-run skips what is
cached, so an interrupted sweep resumes where it stopped. After every job
``DIR/results.json``, ``DIR/tables.md`` and ``DIR/plots/*.png`` are rewritten from
the cache (``qdsl.report``).

Calibration: a recipe's own ``set calib.samples`` wins (Wei et al.'s 512, the Fig. 7
ablation), else ``SweepConfig.calib_default``; ``calib_samples`` forces one value.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from .atomic import write_json_atomic
from .errors import QdslError

log = logging.getLogger(__name__)
FORMAT = 1  # bump when a job's computation changes meaning: old cache entries are ignored


@dataclass(frozen=True)
class SweepConfig:
    model: str = "smollm2-135m"
    bench: str = "stdlib"
    n: int = 100                 # completion samples
    bench_seed: int = 0
    ppl_windows: int = 32
    ctx_tokens: int = 256
    max_new_tokens: int = 48
    prompt: str | None = None    # None: the model's best measured prompt mode
    calib: str = "stdlib"        # calibration data (stdlib = non-test stdlib sources)
    calib_default: int = 32      # windows, for recipes that set none
    calib_samples: int | None = None  # force this many windows for every recipe
    calib_seq_len: int = 256
    calib_seed: int = 0
    layer_windows: int = 4       # Fig. 6b: max |x| per layer over this many windows
    layer_tokens: int = 128      # tokens per layer-statistics window
    perturb_prob: float = 0.35   # robust jobs: NL-Augmenter ChangeCharCase probability
    perturb_seed: int = 0
    threads: int = 1             # torch threads per job (2 threads on 2 busy cores: ~10x slower)
    bench_int8: bool = True      # run qdsl bench for lower = int8 recipes
    humaneval: int = 0           # HumanEval problems for pass@1 tables (0: no HumanEval jobs)
    humaneval_tokens: int = 300  # new tokens per HumanEval completion


@dataclass(frozen=True)
class Job:
    recipe: str | None   # path of a .qrec file; None = the float baseline
    kind: str = "quality"  # "quality" | "robust" | "humaneval"
    lower: str | None = None  # overrides the recipe's `set lower` ("int8": real lowering)

    @classmethod
    def of(cls, row, kind: str = "quality") -> Job:
        """The job of a table row (``qdsl.tables.Row``)."""
        from .tables import recipe_path

        return cls(recipe_path(row.recipe) if row.recipe else None, kind, row.lower)


# ------------------------------------------------------------------ keys


def bench_hash(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.id, s.context, s.target]).encode())
    return h.hexdigest()[:16]


def prompt_mode(cfg: SweepConfig) -> str:
    from .eval.complete import DEFAULT_PROMPT, PROMPT_BY_MODEL

    return cfg.prompt or PROMPT_BY_MODEL.get(str(cfg.model).lower(), DEFAULT_PROMPT)


def effective_settings(recipe, cfg: SweepConfig, lower: str | None = None):
    """Sweep defaults, then the recipe's own settings, then forced overrides."""
    from .recipe import Settings

    st = Settings(calib_samples=cfg.calib_default, calib_seq_len=cfg.calib_seq_len,
                  calib_seed=cfg.calib_seed, calib_data=cfg.calib).then(recipe.settings)
    return st.then(Settings(calib_samples=cfg.calib_samples, lower=lower))


def job_key(job: Job, cfg: SweepConfig, model_hash: str, bhash: str) -> str:
    payload: dict = {"format": FORMAT, "kind": job.kind, "model": model_hash, "bench": bhash,
                     "eval": [cfg.ctx_tokens, cfg.max_new_tokens, prompt_mode(cfg),
                              cfg.ppl_windows], "layers": [cfg.layer_windows, cfg.layer_tokens]}
    if job.recipe is not None:
        from .lang import load_recipe

        r = load_recipe(job.recipe)
        payload.update(recipe=r.hash(), settings=effective_settings(r, cfg, job.lower).to_json())
    if job.kind == "robust":
        payload["perturb"] = [cfg.perturb_prob, cfg.perturb_seed]
    if job.kind == "humaneval":
        payload["humaneval"] = [cfg.humaneval, cfg.humaneval_tokens]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ one job (any process)

_MODELS: dict = {}   # model name -> (model, tokenizer, max positions); per process


def _model(name: str):
    from .layerstats import FLOAT_REF

    if name not in _MODELS:
        from .eval.run import max_positions_of
        from .models import load_model

        _MODELS.clear()
        FLOAT_REF.clear()
        model, tok = load_model(name)
        _MODELS[name] = model, tok, max_positions_of(model.config)
    return _MODELS[name]


def _cache_len(cfg: SweepConfig, max_pos: int | None) -> int:
    """Static key/value cache of the compiled graphs: room for the longest sequence the
    sweep runs (prompt + new tokens, a calibration or perplexity window), no more:
    decode attends over the whole cache, so a 1024 cache is ~3x slower than 320."""
    need = max(cfg.ctx_tokens + cfg.max_new_tokens, cfg.calib_seq_len, cfg.layer_tokens) + 2
    return min(need, max_pos) if max_pos else need


def _int8_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("qdsl.passes.lower_int8") is not None


def _humaneval_cache_len(cfg: SweepConfig, tok, max_pos: int | None) -> int:
    """Static cache for HumanEval: the longest prompt of the first ``cfg.humaneval``
    problems plus the new tokens (``generate`` left-cuts what still does not fit)."""
    from .eval.humaneval import load_problems

    longest = max(len(tok(p["prompt"], add_special_tokens=False)["input_ids"])
                  for p in load_problems()[:cfg.humaneval])
    need = longest + cfg.humaneval_tokens + 2
    return min(need, max_pos) if max_pos else need


def _compile(recipe, cfg: SweepConfig, lower: str | None, out: dict, progress: bool,
             cache_len: int | None = None):
    import qdsl

    model, tok, max_pos = _model(cfg.model)
    cache_len = cache_len or _cache_len(cfg, max_pos)
    st = effective_settings(recipe, cfg, lower)
    lower = st.lower or "fake"
    if lower == "int8" and not _int8_available():
        out["bench"] = {"skipped": "int8 lowering not available (qdsl.passes.lower_int8 "
                                   "missing): compiled as fake-quant"}
        lower = "fake"
    # calibration windows must fit the graph's cache (stdlib-gpt2: 256 positions)
    st = replace(st, calib_seq_len=min(st.calib_seq_len or 256, cache_len - 1))
    t = time.time()
    qm = qdsl.compile(model, recipe, tokenizer=tok, settings=st, lower=lower,
                      max_cache_len=cache_len, fallback="simulate",
                      progress=progress)
    out.update(compile_seconds=round(time.time() - t, 2), lower=lower,
               calib_samples=st.calib_samples, settings=st.to_json(),
               fallbacks=len(getattr(qm, "fallbacks", None) or ()))
    return qm


def run_job(job: Job, cfg: SweepConfig, samples, out_dir: Path, *, progress: bool = False,
            artifact: Path | None = None) -> dict:
    """Run one job -> its result dict (the caller caches it). ``artifact``: where the
    recipe's compiled model is saved (quality job) or reloaded from (robust job)."""
    from .eval.complete import CompletionConfig, evaluate
    from .lang import load_recipe
    from .lm import HFCausalLM
    from .layerstats import float_reference, layer_stats, layer_windows
    from .tables import describe_bits

    t0 = time.time()
    model, tok, max_pos = _model(cfg.model)
    he_cache = _humaneval_cache_len(cfg, tok, max_pos) if job.kind == "humaneval" else None
    max_pos = (he_cache or _cache_len(cfg, max_pos)) - 1  # what the graphs run; float alike
    ccfg = CompletionConfig(cfg.ctx_tokens, cfg.max_new_tokens, prompt_mode(cfg))
    windows = layer_windows(tok, samples, cfg)
    out: dict = {"kind": job.kind, "recipe": job.recipe, "model": cfg.model}
    qm = None
    if job.recipe is None:
        lm = HFCausalLM(model, cfg.model)
        out.update(bits="fp32", lower="float")
    else:
        recipe = load_recipe(job.recipe)
        out["recipe_hash"] = recipe.hash()
        qm = _reload(artifact, model, he_cache) if job.kind != "quality" else None
        if qm is None:  # HumanEval compiles with its longer cache (slower calibration)
            qm = _compile(recipe, cfg, job.lower, out, progress, he_cache)
            if artifact is not None and job.kind != "humaneval":
                qm.save(artifact, force=True)
                out["artifact"] = str(artifact)
        lm = qm.lm(name=Path(job.recipe).stem)
        out["bits"] = describe_bits(qm.plan)
    if job.kind == "humaneval":
        from .eval.humaneval import run_humaneval

        out["humaneval"] = run_humaneval(lm, tok, cfg.humaneval, cfg.humaneval_tokens,
                                         heal=ccfg.prompt == "heal", max_positions=max_pos,
                                         progress=progress)
    elif job.kind == "robust":
        from .robust import robust_scores

        out["robust"] = robust_scores(lm, tok, samples, ccfg, max_positions=max_pos,
                                      prob=cfg.perturb_prob, seed=cfg.perturb_seed,
                                      progress=progress)
    else:
        t = time.time()
        res = evaluate(lm, tok, samples, ccfg, max_positions=max_pos,
                       ppl_windows=cfg.ppl_windows, progress=progress)
        out.update({k: res.get(k) for k in ("n", "em", "es", "ppl", "bpb", "ppl_windows")})
        out["eval_seconds"] = round(time.time() - t, 2)
        out["samples"] = [{k: r[k] for k in ("id", "pred", "em", "es")} for r in res["samples"]]
        _sizes(qm, model, out, job, cfg, out_dir)
        if windows:
            t = time.time()
            if qm is None:
                ref = float_reference(cfg, windows)
                out["layers"] = {n: {"max_abs_windows": ref["max_abs"][n]} for n in ref["names"]}
            elif qm.lower == "fake":  # int8 lowering replaced the named nodes
                out["layers"] = layer_stats(qm, cfg, windows)
            out["layer_seconds"] = round(time.time() - t, 2)
    out["seconds"] = round(time.time() - t0, 2)
    del qm, lm
    gc.collect()
    return out


def _sizes(qm, model, out: dict, job: Job, cfg: SweepConfig, out_dir: Path) -> None:
    """Estimated parameter storage; int8 lowerings: the artifact's real size and bench."""
    if qm is None:
        n = sum(p.numel() for p in model.parameters() if p.is_floating_point())
        out.update(size_before=n * 4, size_after=n * 4, size_mb=n * 4 / 1e6, compression=1.0)
        return
    from .tables import storage

    before, after = storage(model, qm.named, qm.plan)
    out.update(size_before=before, size_after=after, size_mb=after / 1e6,
               compression=before / after if after else None)
    if qm.lower == "int8":
        from .artifact import artifact_size

        art = Path(out.get("artifact") or out_dir / "artifacts" / Path(job.recipe).stem)
        if "artifact" not in out:
            qm.save(art, force=True)
        out["artifact_bytes"] = artifact_size(art)
        if cfg.bench_int8:
            try:
                from .bench import BenchConfig, run_bench

                out["bench"] = run_bench(cfg.model, artifact=str(art),
                                         cfg=BenchConfig(repeats=3, rounds=1))
            except (ImportError, QdslError) as e:
                out["bench"] = {"skipped": f"{type(e).__name__}: {e}"}


def _reload(artifact: Path | None, model, cache_len: int | None = None):
    """A quality job's compiled model, without calibrating again (None if unusable);
    ``cache_len``: re-captured with this static cache."""
    import qdsl

    if artifact is None or not (Path(artifact) / "qdsl_artifact.json").exists():
        return None
    try:
        return qdsl.load(artifact, model, max_cache_len=cache_len)
    except QdslError as e:
        log.warning("cannot reload %s (%s); compiling again", artifact, e)
        return None


def _worker(job: Job, cfg: SweepConfig, samples, out_dir: str, key: str, threads: int,
            progress: bool = False, artifact: str | None = None) -> tuple[str, dict]:
    """Run a job and cache it (in a pool process or in the sweep's own)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    try:
        res = run_job(job, cfg, samples, Path(out_dir), progress=progress,
                      artifact=Path(artifact) if artifact else None)
    except Exception as e:  # a failed job is reported, not cached, and retried next run
        log.debug("job %s failed", job, exc_info=True)
        return key, {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                     "recipe": job.recipe, "kind": job.kind}
    res.update(key=key, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_json_atomic(Path(out_dir) / "cache" / f"{key}.json", res)
    return key, res


# ------------------------------------------------------------------ the sweep


def memory_jobs(requested: int, model: str) -> int:
    """How many jobs fit in available memory (~6x the fp32 weights each, + 1 GB)."""
    import psutil

    from .models import resolve_model

    try:
        d = resolve_model(model).path
        weights = sum(f.stat().st_size for f in Path(d).glob("*.safetensors")) or 1 << 30
    except QdslError:
        weights = 1 << 30
    fit = int(psutil.virtual_memory().available // (6 * weights + (1 << 30)))
    return max(1, min(requested, fit))


def plan_jobs(tables, humaneval: bool = False) -> list[Job]:
    """Jobs of the tables in order, baseline first; a robust table's robust jobs (and,
    with ``humaneval``, a pass@1 table's HumanEval jobs) follow its quality jobs (they
    reload the compiled models). Deduplicated."""
    jobs = [Job(None)]
    for t in tables:
        jobs += [Job.of(r) for r in t.rows]
        if t.kind == "robust":
            jobs += [Job.of(r, "robust") for r in t.rows]
        if humaneval and "pass@1" in t.paper_cols:
            jobs += [Job.of(r, "humaneval") for r in t.rows]
    seen, out = set(), []
    for j in jobs:
        if j not in seen:
            seen.add(j)
            out.append(j)
    return out


def run_sweep(cfg: SweepConfig, out_dir: str | os.PathLike, *, tables=(), recipes=(),
              jobs: int = 1, progress: bool = True, only_report: bool = False) -> dict:
    """Run (or resume) the jobs of ``tables`` (``qdsl.tables.Table``s) and of loose
    ``recipes`` (one extra table, "recipes"); returns what ``DIR/results.json`` holds.
    ``only_report``: run nothing, rewrite the reports from the cache."""
    from .eval.bench import load_bench
    from .models import resolve_model
    from .tables import TABLES, adhoc_table, write_all

    out = Path(out_dir)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    samples = load_bench(cfg.bench, cfg.n, cfg.bench_seed)
    model_hash = resolve_model(cfg.model).content_hash[:16]
    bhash = bench_hash(samples)
    tables = ([adhoc_table(list(recipes))] if recipes else []) + list(tables)  # run in order
    he = cfg.humaneval > 0
    todo = plan_jobs(tables, he)
    others = [t for t in TABLES.values() if t not in tables]
    keys = {j: job_key(j, cfg, model_hash, bhash) for j in plan_jobs(tables + others, he)}
    done = {k: r for k in set(keys.values()) if (r := read_json(out / "cache" / f"{k}.json"))}
    # the report also shows every other seed table with a finished row in this cache
    shown = tables + [t for t in others
                      if any(keys[Job.of(r)] in done for r in t.rows if r.recipe)]
    pending, seen = [], set()
    for j in todo:
        if keys[j] not in done and keys[j] not in seen:
            seen.add(keys[j])
            pending.append(j)
    meta = {"config": asdict(cfg), "model_hash": model_hash, "bench_hash": bhash,
            "n_samples": len(samples)}
    failed: dict = {}

    def write():
        return write_all(out, meta, shown, keys, done, failed, wall=time.time() - t0)

    if only_report or not pending:
        return write()
    workers = memory_jobs(jobs, cfg.model) if jobs > 1 else 1
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // workers)
    log.info("sweep: %d jobs (%d distinct), %d to run, %d worker(s) x %d thread(s)",
             len(todo), len({keys[j] for j in todo}), len(pending), workers, threads)
    bar = tqdm(total=len(pending), desc="sweep", unit="job", disable=not progress)

    def finish(key: str, res: dict) -> None:
        if "error" in res:
            failed[key] = res
            log.warning("job %s failed: %s", res.get("recipe"), res["error"])
        else:
            done[key] = res
        bar.update(1)
        bar.set_postfix_str(Path(res.get("recipe") or "fp32").stem)
        write()

    def artifact(j: Job) -> str | None:  # robust / HumanEval reload the quality job's model
        q = replace(j, kind="quality")
        return None if j.recipe is None else str(out / "artifacts" / keys[q])

    if workers == 1:
        for j in pending:
            finish(*_worker(j, cfg, samples, str(out), keys[j], threads, progress, artifact(j)))
    else:  # a robust job running beside its quality job compiles for itself
        import multiprocessing as mp
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futs = [pool.submit(_worker, j, cfg, samples, str(out), keys[j], threads, False,
                                artifact(j)) for j in pending]
            for f in as_completed(futs):
                finish(*f.result())
    bar.close()
    return write()


def config_with(cfg: SweepConfig, **changes) -> SweepConfig:
    """``cfg`` with the non-None ``changes`` applied (the command line's overrides)."""
    return replace(cfg, **{k: v for k, v in changes.items() if v is not None})
