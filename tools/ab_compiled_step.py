"""Paired A/B of two compiled decode steps of one artifact, inside one process.

Both variants are compiled on the same graph and key/value cache; an environment
variable the compiled step reads when it compiles (``QDSL_FUSE_SIBLINGS``,
``QDSL_COMPILE_CHECKS``, ...) is set for A and unset for B. After one prefill of
``--context`` tokens they alternate blocks of ``--block`` decode steps (ABBA), each
block's figure its mean ms/token; the result is the geometric mean of the ratios B / A
with its 95% t interval. Blocks of 4 steps resolve ~1.5% on a shared 2-core host (an
A/A run, ``--a-env QDSL_UNUSED=1``, gave 1.000 [0.987, 1.014] over 62 pairs).

    python tools/ab_compiled_step.py ARTIFACT --a-env QDSL_FUSE_SIBLINGS=0 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from qdsl.compiler.loading import load_artifact_lm
from qdsl.runtime.compiled import CompiledStep
from qdsl.study.stats import time_ratio


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--a-env", required=True, help="NAME=VALUE set while A compiles")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=62)
    ap.add_argument("--cache-len", type=int, default=1024)
    a = ap.parse_args(argv)
    name, _, value = a.a_env.partition("=")
    if a.context + 2 * a.block * a.pairs + 8 >= a.cache_len:
        ap.error("context + 2 * block * pairs must fit the cache (--cache-len)")
    torch.set_num_threads(a.threads)
    lm = load_artifact_lm(a.artifact, max_cache_len=a.cache_len)
    steps = {"A": CompiledStep(lm.gm, "A"),
             "B": CompiledStep(torch.fx.GraphModule(lm.gm, lm.gm.graph), "B")}
    ids = torch.randint(0, 1000, (1, a.context), generator=torch.Generator().manual_seed(0))
    old = os.environ.get(name)
    for side, step in steps.items():          # compile each under its environment
        if side == "A":
            os.environ[name] = value
        else:
            os.environ.pop(name, None)
        lm.step = step
        logits = lm.prefill(ids[:, :8])
        for _ in range(2):
            logits = lm.decode(int(logits.argmax()))
        if step.failed:
            print(f"{side} failed to compile: {step.failed}", file=sys.stderr)
            return 1
    if old is not None:
        os.environ[name] = old
    logits = lm.prefill(ids)
    ms = {"A": [], "B": []}
    for i in range(a.pairs):
        for side in (("A", "B") if i % 4 in (0, 3) else ("B", "A")):
            lm.step = steps[side]
            t0 = time.perf_counter()
            for _ in range(a.block):
                logits = lm.decode(int(logits.argmax()))
            ms[side].append((time.perf_counter() - t0) / a.block * 1e3)
    iv = time_ratio(ms["B"], ms["A"])
    print(f"A ({a.a_env}) median {statistics.median(ms['A']):.3f} ms, B median "
          f"{statistics.median(ms['B']):.3f} ms; B / A {iv.est:.3f} "
          f"[{iv.lo:.3f}, {iv.hi:.3f}] ({iv.n} pairs of {a.block} steps, "
          f"{torch.backends.cpu.get_cpu_capability()}, {a.threads} thread(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
