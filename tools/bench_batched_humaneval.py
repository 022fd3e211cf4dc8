"""Batched against one-at-a-time HumanEval generation (``run_humaneval``'s
``batch_size``), side by side in one process on the same problems: seconds of each
and whether the completions are identical.

    .venv/bin/python tools/bench_batched_humaneval.py smollm2-135m [ART ...] \\
        --problems 24 --batch-size 8 --json /tmp/he_batched.json

Each model (a name or an artifact directory) is loaded at batch 1 and at
``--batch-size``; the problems are cut in chunks of the batch size and per chunk both
run, the order alternating, so load changes on a shared machine hit both alike.
Generation only: nothing is executed.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from qdsl.eval.humaneval import generate, generate_batch, load_problems
from qdsl.eval.run import load_lm


def bench(name: str, problems: list[dict], rows: int) -> dict:
    one, tok, max_pos, _ = load_lm(name, batch_size=1)
    many, _, _, _ = load_lm(name, batch_size=rows)
    t_one = t_many = 0.0
    same = 0
    for c in range(0, len(problems), rows):
        prompts = [p["prompt"] for p in problems[c:c + rows]]
        for arm in ((0, 1) if (c // rows) % 2 == 0 else (1, 0)):
            t = time.perf_counter()
            if arm == 0:
                singles = [generate(one, tok, p, 300, max_pos) for p in prompts]
                t_one += time.perf_counter() - t
            else:
                batched = generate_batch(many, tok, prompts, 300, max_pos)
                t_many += time.perf_counter() - t
        same += sum(a == b for a, b in zip(singles, batched))
        print(f"{name}: {c + len(prompts)}/{len(problems)}  batch 1 {t_one:.1f} s  "
              f"batch {rows} {t_many:.1f} s  identical {same}", flush=True)
    return {"model": name, "problems": len(problems), "batch_size": rows,
            "batch1_s": round(t_one, 2), "batched_s": round(t_many, 2),
            "speedup": round(t_one / t_many, 3), "identical": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--problems", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    problems = load_problems()[:args.problems]
    out = {"cpu": torch.backends.cpu.get_cpu_capability(), "threads": args.threads,
           "torch": torch.__version__,
           "rows": [bench(m, problems, args.batch_size) for m in args.models]}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
