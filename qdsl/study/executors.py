"""Where a sweep's jobs run: ``local`` (the default: in the sweep's process, or a pool
of ``-j`` processes on this machine) or ``ray`` (each job a Ray task on a cluster).

Both run ``qdsl.study.sweepjob._worker``, which skips a job whose entry is already in
the cache and writes the entry whole (``qdsl.study.sweepcache.CacheStore``); the sweep
(``qdsl.study.sweep``) checks the cache before it submits anything, so a cached job
runs nowhere. Results are the same whichever executor ran a job: only wall times,
timestamps and the artifact paths differ.

Ray (``pip install qdsl[ray]``, imported only when asked for): every job is a task
declaring ``num_cpus`` (the sweep's torch threads per job) and ``memory`` (bytes):
the largest peak RSS a finished job of the same kind recorded in this cache (each
entry holds its ``peak_rss_bytes``) times ``MARGIN``, or, before any has finished,
the estimate ``ESTIMATE_FACTOR`` x the model's fp32 weights + ``ESTIMATE_BASE`` (a
measured upper bound: one job of Qwen2.5-Coder-0.5B peaked at 3.2x its 2.4 GB). A
task whose worker dies, or whose job raises, is run once more (``max_retries=1``,
``retry_exceptions``), then reported failed.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable

from ..errors import OptionError, QdslError
from ..models.zoo import resolve_model
from ..progress import on_stderr
from .jobs import Job, SweepConfig
from .sweepcache import BadEntry, CacheStore
from .sweepjob import _worker

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
ESTIMATE_FACTOR = 3.5      # x the fp32 weights (safetensors bytes) ...
ESTIMATE_BASE = 1 << 30    # ... + 1 GiB (Python, torch, tokenizer, evaluation)
MARGIN = 1.25              # over the largest measured peak of a job of the same kind
RETRIES = 1                # a failed Ray task runs once more, then is reported failed
STOP_GRACE = 10.0          # seconds a terminated -j worker has before SIGKILL
FAULTS_ENV = "QDSL_SWEEP_FAULTS"  # tests only: a JSON file of faults to inject in Ray tasks

Finish = Callable[[str, dict], None]   # (key, result or {"error": ...}) -> None


def weight_bytes(model: str) -> int:
    """The model's safetensors bytes (1 GiB where they cannot be found)."""
    try:
        d = resolve_model(model).path
        return sum(f.stat().st_size for f in Path(d).glob("*.safetensors")) or 1 << 30
    except (QdslError, OSError):
        return 1 << 30


def estimate_memory(model: str) -> int:
    """A job's memory before any was measured: ``ESTIMATE_FACTOR`` x fp32 weights + 1 GiB."""
    return int(ESTIMATE_FACTOR * weight_bytes(model) + ESTIMATE_BASE)


def job_memory(kind: str, done: dict, model: str) -> tuple[int, str]:
    """(bytes to declare for a ``kind`` job, where the figure comes from): the largest
    peak RSS recorded by a finished ``kind`` job in the cache x ``MARGIN``, else the
    estimate from the model's size."""
    peaks = [e["peak_rss_bytes"] for e in done.values()
             if e.get("kind") == kind and isinstance(e.get("peak_rss_bytes"), int)]
    if peaks:
        return int(max(peaks) * MARGIN), f"measured peak {max(peaks) / 2**30:.2f} GiB x {MARGIN}"
    return estimate_memory(model), (f"estimate {ESTIMATE_FACTOR} x fp32 weights + 1 GiB "
                                    "(no finished job of this kind to measure)")


class LocalExecutor:
    """Jobs on this machine: one after another in this process, or a pool of
    ``workers`` spawned processes (``-j``)."""

    name = "local"

    def __init__(self, workers: int = 1, progress: bool = True):
        self.workers, self.progress = workers, progress

    def run(self, subs: list[tuple[Job, str, str | None]], cfg: SweepConfig, samples,
            out: Path, store: CacheStore, threads: int, done: dict, finish: Finish) -> None:
        """Run ``subs`` ((job, key, artifact) each), calling ``finish`` as each ends."""
        if self.workers == 1:
            for j, key, art in subs:   # live bars on a terminal, labelled lines in a log
                shown = self.progress and on_stderr(j.label)
                finish(*_worker(j, cfg, samples, str(out), key, threads, shown, art, store))
            return
        # a robust job running beside its quality job compiles for itself
        pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
        try:
            # each job's progress as labelled lines (live bars would overwrite each other)
            futs = [pool.submit(_worker, j, cfg, samples, str(out), key, threads,
                                j.label if self.progress else False, art, store)
                    for j, key, art in subs]
            for f in as_completed(futs):
                finish(*f.result())
        except BrokenProcessPool as e:   # the system killed a worker: not a qdsl bug
            stop_pool(pool)
            raise QdslError(_died(done)) from e
        except BaseException:  # Ctrl-C, SIGTERM (the CLI's KeyboardInterrupt), a failure
            stop_pool(pool)
            raise
        pool.shutdown()


def _died(done: dict) -> str:
    """What to say when a worker process died mid-job (the pool is broken)."""
    peaks = [e["peak_rss_bytes"] for e in done.values()
             if isinstance(e.get("peak_rss_bytes"), int)]
    need = (f"; the largest finished job here peaked at {max(peaks) / 2**30:.1f} GiB"
            if peaks else "")
    return ("a sweep worker process died while running a job: killed by the system, most "
            "often for lack of memory (each of the -j workers holds its own copy of the "
            f"model{need}). The finished jobs are cached and interrupted ones resume from "
            "DIR/partial: run the same command again, with a smaller -j if memory is short")


def stop_pool(pool: ProcessPoolExecutor, grace: float = STOP_GRACE) -> None:
    """Stop a pool now: queued jobs are cancelled and running workers terminated
    (SIGTERM, then SIGKILL after ``grace`` seconds). ``shutdown`` alone would wait for
    every running job to finish, so a SIGTERM to the sweep left its workers computing.
    A killed job leaves no cache entry: entries are written whole (temporary file, then
    rename), and the sweep runs the job again next time."""
    # the pool's processes are private; Python 3.14 has terminate_workers() for this
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(grace)
        if p.is_alive():
            p.kill()
            p.join()


def _import_ray():
    try:
        import ray  # optional: pip install qdsl[ray]
    except ImportError as e:
        raise OptionError("--executor ray needs Ray, which is not installed: "
                          "pip install 'qdsl[ray]' (or pip install 'ray>=2.40,<3')") from e
    return ray


def _inject_fault(job: Job, key: str, store: CacheStore) -> None:
    """Tests only: the faults named in the JSON file ``$QDSL_SWEEP_FAULTS`` (recipe stem
    -> "raise" | "crash-once"), each attempt counted in ``attempts.jsonl`` beside it.
    "crash-once": the first attempt leaves a half-written temporary entry in the cache,
    as a worker killed mid-write would, and the worker process dies."""
    spec = os.environ.get(FAULTS_ENV)
    if not spec:
        return
    faults = json.loads(Path(spec).read_text())
    stem = Path(job.recipe).stem if job.recipe else "fp32"
    log_file = Path(spec).with_name("attempts.jsonl")
    with open(log_file, "a") as f:
        f.write(json.dumps({"key": key, "recipe": stem, "pid": os.getpid()}) + "\n")
    attempts = sum(json.loads(line)["key"] == key for line in log_file.read_text().splitlines())
    what = faults.get(stem)
    if what == "raise":
        raise RuntimeError(f"injected failure in {stem} (attempt {attempts})")
    if what == "crash-once" and attempts == 1:
        half = b'{"kind": "quality", "recipe'
        if store.fs is None:
            Path(store.location, f".{key}.json.dead.tmp").write_bytes(half)
        else:
            fs, root = store.fs
            fs.pipe_file(f"{root.rstrip('/')}/.{key}.json.dead.tmp", half)
        os._exit(1)


def _ray_task(job: Job, cfg: SweepConfig, samples, out_dir: str, key: str, threads: int,
              artifact: str | None, store: CacheStore) -> tuple[str, dict]:
    """One job in a Ray worker (the cache is checked again there: another driver or an
    earlier attempt may have finished it)."""
    _inject_fault(job, key, store)
    return _worker(job, cfg, samples, out_dir, key, threads, False, artifact, store,
                   raise_errors=True)


class RayExecutor:
    """Jobs as Ray tasks: on the cluster at ``address`` ("auto": the one ``ray start``
    started on this machine; a ``ray://host:10001`` client address), on the one this
    process already joined (``ray.init`` before the sweep), or else on a local cluster
    started here for the sweep and stopped after it."""

    name = "ray"

    def __init__(self, address: str | None = None):
        self.address = address
        self.ray = _import_ray()

    def run(self, subs: list[tuple[Job, str, str | None]], cfg: SweepConfig, samples,
            out: Path, store: CacheStore, threads: int, done: dict, finish: Finish) -> None:
        ray = self.ray
        started = not ray.is_initialized()
        if started:
            try:
                ray.init(address=self.address, include_dashboard=False,
                         logging_level=logging.WARNING)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise OptionError(f"--executor ray: cannot join the Ray cluster "
                                  f"{self.address or '(a new local one)'}: {e}") from e
        try:
            self._run(subs, cfg, samples, out, store, threads, done, finish)
        finally:
            if started:
                ray.shutdown()

    def _largest_node_memory(self) -> int | None:
        mems = [n["Resources"].get("memory", 0) for n in self.ray.nodes() if n.get("Alive")]
        return int(max(mems)) if mems and max(mems) > 0 else None

    def _run(self, subs, cfg, samples, out, store, threads, done, finish) -> None:
        ray = self.ray
        task = ray.remote(_ray_task)
        cpus = max(1, threads)
        node_mem = self._largest_node_memory()
        samples_ref = ray.put(samples)
        refs = {}
        for j, key, art in subs:
            mem, why = job_memory(j.kind, done, cfg.model)
            if node_mem and mem > node_mem:
                log.warning("a %s job needs about %.1f GiB (%s), more than any node offers "
                            "(%.1f GiB): declaring %.1f GiB", j.kind, mem / 2**30, why,
                            node_mem / 2**30, node_mem / 2**30)
                mem = node_mem
            log.info("ray: %s job %s: num_cpus=%d memory=%.2f GiB (%s)", j.kind,
                     Path(j.recipe).stem if j.recipe else "fp32", cpus, mem / 2**30, why)
            ref = task.options(num_cpus=cpus, memory=mem, max_retries=RETRIES,
                               retry_exceptions=True,
                               name=f"qdsl-{j.kind}-{key}").remote(
                j, cfg, samples_ref, str(out), key, threads, art, store)
            refs[ref] = (j, key)
        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                for ref in ready:
                    j, key = refs.pop(ref)
                    finish(key, self._result(ref, j, key, store))
        except BaseException:   # Ctrl-C: stop what still runs; finished entries stay
            for ref in refs:
                ray.cancel(ref, force=True)
            raise

    def _result(self, ref, job: Job, key: str, store: CacheStore) -> dict:
        ray = self.ray
        try:
            _, res = ray.get(ref)
        except ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None)
            msg = f"{type(cause).__name__}: {cause}" if cause else f"{type(e).__name__}: {e}"
            return {"error": f"failed twice on Ray (retried once): {msg.splitlines()[0]}",
                    "traceback": str(e), "recipe": job.recipe, "kind": job.kind}
        try:
            seen = store.read(key, job.kind)
        except BadEntry:
            seen = None
        if seen is None:  # a worker's local cache path that the driver cannot see
            store.write(key, res)
        return res


# results.json fields that legitimately differ between two runs of the same sweep
# (executor, machine load, output directory): wall times and timestamps, the
# machine's description and load, the artifact's path, the measured peak RSS, and
# qdsl bench's timings (int8 rows). Everything else must be equal.
VARYING = frozenset({"updated", "machine", "wall_seconds_this_run", "job_seconds_total",
                     "seconds", "compile_seconds", "eval_seconds", "layer_seconds",
                     "complete_seconds", "ppl_seconds",
                     "finished", "artifact", "peak_rss_bytes", "peak_rss_scope", "bench"})


def comparable(results):
    """``results`` (a results.json object) without the ``VARYING`` fields, at any depth."""
    if isinstance(results, dict):
        return {k: comparable(v) for k, v in results.items() if k not in VARYING}
    if isinstance(results, list):
        return [comparable(v) for v in results]
    return results


def make_executor(name: str, *, workers: int = 1, address: str | None = None,
                  progress: bool = True):
    """The executor ``name`` ("local" or "ray"); ``address`` only for Ray."""
    if name == "local":
        if address is not None:
            raise OptionError("--address is for --executor ray")
        return LocalExecutor(workers, progress)
    if name == "ray":
        return RayExecutor(address)
    raise OptionError(f"unknown executor {name!r} (one of: {', '.join(EXECUTORS)})")
