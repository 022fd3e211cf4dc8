"""``qdsl sweep``: compile + evaluate many recipes on one model and benchmark, cached.

A sweep is a list of jobs. A job is one recipe (or the float baseline) and a kind:
``quality`` (compile, line completion EM / ES, perplexity, storage estimate,
per-layer activation statistics; ``int8`` lowerings also the real artifact size
and ``qdsl bench``), ``robust`` (the same model on contexts whose comments and
docstrings are perturbed, ``qdsl.eval.robust``) or ``humaneval`` (HumanEval pass@1 for
the tables whose paper reports it and the recipes named on the command line, with
``SweepConfig.humaneval`` > 0). Robust and
HumanEval jobs reload the quality job's saved artifact instead of calibrating again.
``qdsl.study.sweepjob`` runs one job; this module plans and keys them and hands them
to an executor (``qdsl.study.executors``: local, or a Ray task each); ``Job`` and
``SweepConfig`` are ``qdsl.study.jobs``'s, importable from here too.

Each finished job is written atomically to ``DIR/cache/<key>.json`` (or a ``cache``
directory / fsspec URL given, ``qdsl.study.sweepcache.CacheStore``), key = sha256 of
(kind, recipe meaning hash, effective calibration settings, model content hash,
benchmark content hash, evaluation settings, ``FORMAT``). A re-run skips what is
cached, so an interrupted sweep resumes where it stopped; an entry that cannot be
used (``qdsl.study.sweepcache``) is named in a warning and its job runs again. Within
a quality job the completions and perplexity windows are saved as batches finish
(``DIR/partial/<key>.json``, ``qdsl.eval.checkpoint``): a job stopped mid-evaluation
(a worker killed, the machine's session over) resumes with them, reloading its saved
artifact instead of calibrating again, and the file is removed once the job is
cached. DIR is marked by ``qdsl_sweep.json``: a sweep writes only into a new or empty
directory or one with that marker, one sweep at a time (``qdsl.atomic.output_dir``).
After every job ``DIR/results.json``, ``DIR/tables.md`` and ``DIR/plots/*.png`` are rewritten from
the cache (``qdsl.study.report``).

Calibration: a recipe's own ``set calib.samples`` wins (Wei et al.'s 512, the Fig. 7
ablation), else ``SweepConfig.calib_default``; ``calib_samples`` forces one value
(except on wei-fig7, whose rows vary it).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..atomic import SWEEP, output_dir
from ..errors import OptionError
from ..eval.samples import load_bench
from ..eval.sandbox import sandbox_kind
from ..lang import load_recipe
from ..models.zoo import resolve_model
from ..progress import bar as progress_bar
from ..progress import on_stderr
from .executors import estimate_memory, make_executor
from .jobs import HUMANEVAL, QUALITY, ROBUST, Job, SweepConfig, effective_settings
from .keys import FORMAT, bench_hash, job_key  # noqa: F401  (FORMAT: read as sweep.FORMAT)
from .sweepcache import CacheStore, load_cache
from .tables import TABLES, adhoc_table, write_all

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ checks


def forced_calib_overrides(jobs, cfg: SweepConfig) -> list[str]:
    """A line for each recipe whose own ``set calib.samples`` ``--calib-samples`` replaces
    (a recipe such as wei/fig7_calib_128.qrec named on the command line would otherwise
    silently run with another calibration size)."""
    if cfg.calib_samples is None:
        return []
    out = []
    for path in dict.fromkeys(j.recipe for j in jobs if j.recipe and not j.own_calib):
        own = load_recipe(path).settings.calib_samples
        if own is not None and own != cfg.calib_samples:
            out.append(f"--calib-samples {cfg.calib_samples} overrides "
                       f"{Path(path).name}'s own `set calib.samples = {own}`")
    return out


# ------------------------------------------------------------------ the sweep


def memory_jobs(requested: int, model: str) -> int:
    """How many jobs fit in available memory: ~3.5x the fp32 weights each, + 1 GB
    (measured peak of one job: 3.2x for Qwen2.5-Coder-0.5B's 2.4 GB, 7.8 GB)."""
    import psutil  # not a declared dependency: only -j > 1 needs it

    need = estimate_memory(model)
    avail = psutil.virtual_memory().available
    fit = max(1, min(requested, int(avail // need)))
    if fit < requested:
        log.warning("-j %d: running %d job(s) at a time; each needs about %.1f GB and "
                    "%.1f GB is available", requested, fit, need / 2**30, avail / 2**30)
    return fit


def plan_jobs(tables, humaneval: bool = False) -> list[Job]:
    """Jobs of the tables in order, baseline first; a robust table's robust jobs (and,
    with ``humaneval``, a pass@1 table's HumanEval jobs) follow its quality jobs (they
    reload the compiled models). Deduplicated."""
    jobs = [Job(None)]
    for t in tables:
        jobs += [Job.of(r) for r in t.rows]
        if t.kind == "robust":
            jobs += [Job.of(r, ROBUST) for r in t.rows]
        if humaneval and t.pass1:
            jobs += [Job.of(r, HUMANEVAL) for r in t.rows]
    seen, out = set(), []
    for j in jobs:
        if j not in seen:
            seen.add(j)
            out.append(j)
    return out


def run_sweep(cfg: SweepConfig, out_dir: str | os.PathLike, *, tables=(), recipes=(),
              jobs: int = 1, progress: bool = True, only_report: bool = False,
              executor: str = "local", address: str | None = None,
              cache: str | os.PathLike | None = None) -> dict:
    """Run (or resume) the jobs of ``tables`` (``qdsl.study.tables.Table``s) and of loose
    ``recipes`` (one extra table, "recipes"); returns what ``DIR/results.json`` holds.
    ``only_report``: run nothing, rewrite the reports from the cache.

    ``executor``: "local" (this process, or ``jobs`` processes) or "ray" (a Ray task per
    job, on the cluster at ``address`` or a local one; ``qdsl.study.executors``).
    ``cache``: where the finished jobs live, a directory or an fsspec URL every worker
    can reach (default ``DIR/cache``).

    ``out_dir`` is claimed first (``qdsl.atomic.output_dir``): a directory another sweep
    is writing, or a non-empty one that is not a sweep's (no ``qdsl_sweep.json``), is
    refused before any work."""
    if executor != "local" and jobs > 1:
        raise OptionError(f"-j is for the local executor; --executor {executor} runs as many "
                          "jobs at once as the cluster's CPUs and memory allow")
    with output_dir(out_dir, SWEEP, reuse=True) as claim:
        run = None if only_report else make_executor(
            executor, workers=memory_jobs(jobs, cfg.model) if jobs > 1 else 1,
            address=address, progress=progress)   # Ray missing: refused before any work
        return _sweep(cfg, claim.path, tables=tables, recipes=recipes, run=run,
                      progress=progress, cache=cache)


@dataclass
class _State:
    """What a sweep of some tables would do against its cache right now."""
    samples: list
    model_hash: str
    bench_hash: str
    tables: list        # the tables asked for (loose recipes first, as one table)
    others: list        # every other seed table
    keys: dict          # Job -> cache key, over tables + others
    todo: list          # the jobs of ``tables``, in order
    done: dict          # cache key -> finished entry
    pending: list       # the jobs of ``todo`` not finished, one per key


def _state(cfg: SweepConfig, store: CacheStore, tables, recipes, will_run: bool) -> _State:
    # drawn to at least --ppl-windows samples: run_job completes the first n and scores
    # perplexity on the first ppl_windows (the draw is prefix-stable, so this is the n
    # samples' bench whenever ppl_windows <= n, and its hash the same)
    samples = load_bench(cfg.bench, max(cfg.n, cfg.ppl_windows), cfg.bench_seed)
    model_hash = resolve_model(cfg.model).content_hash[:16]
    bhash = bench_hash(samples)
    he = cfg.humaneval > 0
    tables = ([adhoc_table(list(recipes), he)] if recipes else []) + list(tables)  # in order
    todo = plan_jobs(tables, he)
    others = [t for t in TABLES.values() if t not in tables]
    keys = {j: job_key(j, cfg, model_hash, bhash) for j in plan_jobs(tables + others, he)}
    done = load_cache(store, {k: j.kind for j, k in keys.items()},
                      {keys[j] for j in todo} if will_run else set())
    pending, seen = [], set()
    for j in todo:
        if keys[j] not in done and keys[j] not in seen:
            seen.add(keys[j])
            pending.append(j)
    return _State(samples, model_hash, bhash, tables, others, keys, todo, done, pending)


def plan_sweep(cfg: SweepConfig, out_dir: str | os.PathLike, *, tables=(), recipes=(),
               cache: str | os.PathLike | None = None) -> dict:
    """The jobs a sweep of ``tables`` and ``recipes`` would run now, and what they may
    cost. Read-only (nothing claimed or written), so it answers while that sweep runs.

    Returns ``{"finished": int, "jobs": [...]}``, a job being ``{"kind", "recipe",
    "key", "resumes", "estimate_s", "calib_beyond"}``: ``resumes`` when ``DIR/partial/``
    holds a checkpoint of it (completions, perplexity or calibration), ``estimate_s``
    the median time of the finished jobs of its kind in the cache (None without one: a
    guess from other recipes, not a measurement of this one), ``calib_beyond`` the
    calibration windows of a quality job that calibrates on more than any finished one
    (its estimate is low), else None (also while no quality job has finished)."""
    out = Path(out_dir)
    store = CacheStore(cache if cache is not None else out / "cache")
    st = _state(cfg, store, tables, recipes, will_run=False)
    wanted = {st.keys[j] for j in st.todo}
    seconds: dict[str, list[float]] = {}
    for key, e in st.done.items():
        if e.get("seconds") is not None:
            seconds.setdefault(e.get("kind", QUALITY), []).append(float(e["seconds"]))
    # the most calibration windows a finished quality job ran: a job calibrating on more
    # takes longer than the median says (Fig. 7's 2048 windows: hours more)
    calib_done = max((e.get("calib_samples") or 0 for e in st.done.values()
                      if e.get("kind") == QUALITY), default=0)
    partial = out / "partial"
    jobs = []
    for j in st.pending:
        key = st.keys[j]
        times = sorted(seconds.get(j.kind, []))
        calib = (effective_settings(load_recipe(j.recipe), cfg, j.lower, j.own_calib)
                 .calib_samples if j.kind == QUALITY and j.recipe else None)
        jobs.append({"kind": j.kind, "recipe": j.recipe, "key": key,
                     "resumes": any(partial.glob(f"{key}.*")),
                     "estimate_s": times[len(times) // 2] if times else None,
                     "calib_beyond": calib if calib and 0 < calib_done < calib else None})
    return {"finished": sum(k in st.done for k in wanted), "jobs": jobs}


def _sweep(cfg: SweepConfig, out_dir: Path, *, tables, recipes, run, progress: bool,
           cache) -> dict:
    out = Path(out_dir)
    only_report = run is None
    store = CacheStore(cache if cache is not None else out / "cache")
    store.prepare()
    t0 = time.time()
    st = _state(cfg, store, tables, recipes, will_run=not only_report)
    tables, others, keys, todo = st.tables, st.others, st.keys, st.todo
    done, pending = st.done, st.pending
    # the report also shows every other seed table with a finished row in this cache
    shown = tables + [t for t in others
                      if any(keys[Job.of(r)] in done for r in t.rows if r.recipe)]
    samples = st.samples
    meta = {"config": asdict(cfg), "model_hash": st.model_hash, "bench_hash": st.bench_hash,
            "n_samples": min(len(samples), cfg.n)}
    failed: dict = {}

    def write():
        return write_all(out, meta, shown, keys, done, failed, wall=time.time() - t0)

    if only_report or not pending:
        return write()
    if any(j.kind == HUMANEVAL for j in pending):  # refuse before hours of compiling
        sandbox_kind(cfg.unsafe_exec)
    for line in forced_calib_overrides(pending, cfg):
        log.warning(line)
    workers = getattr(run, "workers", 1)
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // workers)
    log.info("sweep: %d jobs (%d distinct), %d to run on the %s executor, "
             "%d thread(s) per job", len(todo), len({keys[j] for j in todo}), len(pending),
             run.name, threads)
    bar = progress_bar(total=len(pending), desc="jobs", unit="job",
                       progress=progress and on_stderr("[sweep]"))

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
        q = replace(j, kind=QUALITY)
        return None if j.recipe is None else str(out / "artifacts" / keys[q])

    run.run([(j, keys[j], artifact(j)) for j in pending], cfg, samples, out, store,
            threads, done, finish)
    bar.close()
    return write()


def config_with(cfg: SweepConfig, **changes) -> SweepConfig:
    """``cfg`` with the non-None ``changes`` applied (the command line's overrides)."""
    return replace(cfg, **{k: v for k, v in changes.items() if v is not None})
