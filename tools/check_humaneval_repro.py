"""Re-run the first K HumanEval problems of a sweep's HumanEval job with this tree's code
and compare the programs with cached entries of that job: is a row reproducible, and by
which code?

    python tools/check_humaneval_repro.py ARTIFACT K ENTRY.json [ENTRY.json ...] \
        [--model qwen2.5-coder-0.5b]

ARTIFACT is the quality job's saved artifact the HumanEval job reloads
(DIR/artifacts/<key>); it is reloaded as the sweep does (the HumanEval static cache,
one row, 1 thread) and the first K problems are completed greedily (300 tokens) and run
in the sandbox. For each ENTRY (a cache file of the HumanEval job) prints how many of
the K programs are identical. Run it from another tree (PYTHONPATH=that tree) to test
older code on the same artifact.
"""

from __future__ import annotations

import argparse
import json

import torch

from qdsl.eval.humaneval import run_humaneval
from qdsl.study.jobs import SweepConfig
from qdsl.study.sweepjob import _humaneval_cache_len, _model, _reload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("k", type=int)
    ap.add_argument("entries", nargs="+")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    a = ap.parse_args()
    torch.set_num_threads(1)
    cfg = SweepConfig(model=a.model, humaneval=164)
    m = _model(cfg.model)
    qm = _reload(a.artifact, m.model, _humaneval_cache_len(cfg, m.tok, m.max_pos), 1)
    if qm is None:
        raise SystemExit(f"cannot reload {a.artifact}")
    he = run_humaneval(qm.lm(name="check"), m.tok, a.k, cfg.humaneval_tokens, heal=False,
                       max_positions=m.max_pos, progress=False, unsafe=False, batch_size=1)
    now = {r["task_id"]: r.get("completion") for r in he["results"]}
    print(f"cpu {torch.backends.cpu.get_cpu_capability()}, {len(now)} problems")
    for e in a.entries:
        old = {r["task_id"]: r.get("completion")
               for r in json.loads(open(e, encoding="utf-8").read())["humaneval"]["results"]}
        same = sorted(t for t in now if old.get(t) == now[t])
        print(f"{e}: {len(same)} of {len(now)} programs identical ({', '.join(same)})")


if __name__ == "__main__":
    main()
