"""``qdsl eval``: line-completion EM / edit similarity, perplexity and HumanEval
pass@1 of a model or compiled artifact, with deltas against a float baseline."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ...atomic import write_json_atomic
from ...eval.samples import load_bench, save_jsonl
from ...eval.sandbox import sandbox_kind
from ...progress import on_stderr
from ...study.compare import CompareError, Row, compare, render
from ..names import COMMANDS
from ..args import (HUMANEVAL_PROBLEMS, MAX_THREADS, int_range, nonneg_int, output_file,
                    positive_int, seed_int)

DESCRIPTION = """\
Score a model (short name, checkpoint directory or hub id) or a compiled artifact
(a directory with qdsl_artifact.json) on line-level code completion (CodeXGLUE:
exact match, edit similarity), perplexity on held-out windows and optionally
HumanEval pass@1. An artifact is compared with the model it was compiled from.

  qdsl eval smollm2-135m --bench stdlib --n 500
  qdsl eval out/ --bench my_code/ --json out/eval.json
  qdsl eval stdlib-gpt2 --bench stdlib --n 200 --save-bench bench.jsonl

Short names: smollm2-135m, qwen2.5-coder-0.5b, stdlib-gpt2."""


def register(sub) -> None:
    p = sub.add_parser("eval", help=COMMANDS["eval"], description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL_OR_ARTIFACT")
    p.add_argument("--bench", default="stdlib",
                   help="'stdlib' (held-out stdlib tests), a directory of .py files, "
                        "or a .jsonl benchmark (default: stdlib)")
    p.add_argument("--n", type=positive_int, default=None,
                   help="samples, at least 1 (default 500; a JSONL: all)")
    p.add_argument("--seed", type=seed_int, default=0, help="sampling seed (default 0)")
    p.add_argument("--baseline", metavar="MODEL", help="float model to compare with "
                   "(default for an artifact: its source model)")
    p.add_argument("--no-baseline", action="store_true",
                   help="evaluate the target only (the prompt budget is still fitted to the "
                        "baseline, so the rows of several runs on the same samples pair)")
    p.add_argument("--ctx-tokens", type=positive_int, default=None,
                   help="prompt budget and perplexity window in tokens (default 256, clipped "
                        "with a note to what the model holds: its positions, for an artifact "
                        "its static cache; a larger explicit value is an error)")
    p.add_argument("--max-new-tokens", type=positive_int, default=48,
                   help="new tokens per completion (default 48)")
    p.add_argument("--prompt", choices=("newline", "indent", "heal"),
                   help="how the prompt ends (default: the best measured for the model)")
    p.add_argument("--ppl-windows", type=nonneg_int, default=64, metavar="N",
                   help="perplexity windows, one per bench sample from the first (the bench is "
                        "drawn further when N exceeds --n; 0: skip; default 64)")
    p.add_argument("--humaneval", type=int_range(0, HUMANEVAL_PROBLEMS), nargs="?",
                   const=HUMANEVAL_PROBLEMS, default=0, metavar="K",
                   help="also run HumanEval pass@1 on the first K problems (all 164 if no K; "
                        "0: none, the default)")
    p.add_argument("--unsafe-exec", action="store_true",
                   help="where the bubblewrap sandbox for HumanEval's generated code cannot "
                        "be had, run it with resource limits only instead of refusing (the "
                        "code can then use the network and read what nobody/your user can)")
    p.add_argument("--save-bench", metavar="JSONL", type=output_file(".jsonl"),
                   help="freeze the samples to a .jsonl file")
    p.add_argument("--json", metavar="FILE", type=output_file(".json"),
                   help="write all results (per sample too) as a .json file")
    p.add_argument("--batch-size", type=int_range(1, MAX_BATCH), default=None, metavar="N",
                   help="completions (and perplexity windows) decoded together, left-padded "
                        "with a key/value cache per row (default 8, for a model and an "
                        "artifact alike; 1: one at a time). Completions equal batch 1 up to "
                        "float summation order; an artifact whose recipe quantizes an "
                        "activation dynamically per tensor runs batch 1 (with a note when "
                        "--batch-size asked for more); --humaneval batches its problems "
                        "the same way")
    p.add_argument("--threads", type=int_range(0, MAX_THREADS), default=0,
                   help="torch CPU threads (0, the default: torch's choice; 1 on a busy "
                        "machine)")
    p.add_argument("--no-progress", action="store_true",
                   help="show no progress (default: live bars on a terminal, plain lines "
                        "starting with [eval], at most one a minute, where stderr is not one)")
    p.add_argument("--no-verify", action="store_true",
                   help="load an artifact even if its files do not match the sha256 "
                        "recorded at compile time (damaged or edited); the format checks "
                        "still run")
    p.set_defaults(func=run)


MAX_BATCH = 256


def _fmt(x, digits=2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _check_artifact(path: str, verify: bool) -> None:
    """A damaged artifact: one line before the benchmark or any model is loaded."""
    try:
        from ...artifact.store import read_artifact
    except ImportError:  # a build without the compiler: loading it says so
        return
    read_artifact(path, verify=verify)


def run(args) -> int:
    from ...eval.run import fit_eval, run_eval

    if args.humaneval:  # no sandbox: refuse before anything is loaded
        sandbox_kind(args.unsafe_exec)
    if (Path(args.model) / "qdsl_artifact.json").is_file():
        _check_artifact(args.model, verify=not args.no_verify)
    if args.threads > 0:
        import torch
        torch.set_num_threads(args.threads)
    # lengths against the models' configs before the benchmark or a model is loaded
    ctx_tokens, _ = fit_eval(args.model, args.baseline, args.ctx_tokens, args.max_new_tokens)
    # drawn to at least --ppl-windows: the first --n are completed, the first
    # --ppl-windows give perplexity's windows (the draw is prefix-stable)
    pool = load_bench(args.bench, None if args.n is None else max(args.n, args.ppl_windows),
                      args.seed)
    samples = pool if args.n is None else pool[:args.n]
    if args.save_bench:
        save_jsonl(samples, args.save_bench)
    res = run_eval(args.model, samples, bench=args.bench, baseline=args.baseline,
                   ctx_tokens=ctx_tokens, max_new_tokens=args.max_new_tokens,
                   prompt=args.prompt, ppl_windows=args.ppl_windows,
                   humaneval=args.humaneval, unsafe_exec=args.unsafe_exec,
                   progress=not args.no_progress and on_stderr("[eval]"),
                   verify=not args.no_verify,
                   batch_size=args.batch_size, compare=not args.no_baseline,
                   ppl_samples=pool)
    rows = [r for r in (res["target"], res["baseline"]) if r]
    print(f"bench {args.bench}: {res['n']} samples, seed {args.seed}")
    print(f"{'model':<28} {'EM':>6} {'ES':>6} {'ppl':>8} {'bpb':>6} {'pass@1':>7} {'s/sample':>8}")
    for r in rows:
        he = r.get("humaneval", {}).get("pass@1")
        print(f"{r['model'][:28]:<28} {_fmt(r['em']):>6} {_fmt(r['es']):>6} "
              f"{_fmt(r.get('ppl')):>8} {_fmt(r.get('bpb'), 3):>6} {_fmt(he, 3):>7} "
              f"{_fmt(r['complete_seconds'] / max(1, r['n'])):>8}")
    if res.get("target") and res.get("baseline"):
        # the target against the float model on the same samples: paired, with intervals
        try:
            res["paired"] = compare(Row("target", res["target"]), Row("baseline", res["baseline"]))
            print(render(res["paired"]))
        except CompareError as e:   # e.g. a run with no completion samples
            print(f"(no paired comparison: {e})")
    if args.json:
        write_json_atomic(args.json, res)
        print(f"wrote {args.json}")
    return 0
