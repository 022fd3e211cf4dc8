"""Paired A/B of two compiled decode steps inside one process: one artifact under two
environments, or two artifacts (``--b-artifact``, each with its own cache).

Both variants are compiled on the same graph and key/value cache; an environment
variable the compiled step reads when it compiles (``QDSL_FUSE_SIBLINGS``,
``QDSL_COMPILE_CHECKS``, ...) is set for A and unset for B. After one prefill of
``--context`` tokens they alternate blocks of ``--block`` decode steps (ABBA), each
block's figure its mean ms/token; the result is the geometric mean of the ratios B / A
with its 95% t interval. Blocks of 4 steps resolve ~1.5% on a shared 2-core host (an
A/A run, ``--a-env QDSL_UNUSED=1``, gave 1.000 [0.987, 1.014] over 62 pairs).

    python tools/ab_compiled_step.py ARTIFACT --a-env QDSL_FUSE_SIBLINGS=0 --threads 1
    python tools/ab_compiled_step.py ARTIFACT --b-artifact ARTIFACT_FP16_CACHE --threads 1
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
    ap.add_argument("--a-env", default="", help="NAME=VALUE set while A compiles")
    ap.add_argument("--b-artifact", help="B: this artifact (same environment), its own cache")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=62)
    ap.add_argument("--cache-len", type=int, default=1024)
    a = ap.parse_args(argv)
    if not a.a_env and not a.b_artifact:
        ap.error("nothing differs between A and B: give --a-env or --b-artifact")
    name, _, value = a.a_env.partition("=")
    if a.context + 2 * a.block * a.pairs + 8 >= a.cache_len:
        ap.error("context + 2 * block * pairs must fit the cache (--cache-len)")
    torch.set_num_threads(a.threads)
    lm = load_artifact_lm(a.artifact, max_cache_len=a.cache_len)
    if a.b_artifact:
        lms = {"A": lm, "B": load_artifact_lm(a.b_artifact, max_cache_len=a.cache_len)}
        steps = {side: CompiledStep(m.gm, side) for side, m in lms.items()}
    else:                                     # one graph and cache, two compiled steps
        lms = {"A": lm, "B": lm}
        steps = {"A": CompiledStep(lm.gm, "A"),
                 "B": CompiledStep(torch.fx.GraphModule(lm.gm, lm.gm.graph), "B")}
    ids = torch.randint(0, 1000, (1, a.context), generator=torch.Generator().manual_seed(0))
    old = os.environ.get(name) if name else None
    for side, step in steps.items():          # compile each under its environment
        if name and side == "A":
            os.environ[name] = value
        elif name:
            os.environ.pop(name, None)
        lms[side].step = step
        logits = lms[side].prefill(ids[:, :8])
        for _ in range(2):
            logits = lms[side].decode(int(logits.argmax()))
        if step.failed:
            print(f"{side} failed to compile: {step.failed}", file=sys.stderr)
            return 1
    if old is not None:
        os.environ[name] = old
    last = {}      # the logits each model's next step follows (one model: env mode)
    for m in lms.values():
        if id(m) not in last:
            last[id(m)] = m.prefill(ids)
    ms = {"A": [], "B": []}
    for i in range(a.pairs):
        for side in (("A", "B") if i % 4 in (0, 3) else ("B", "A")):
            m = lms[side]
            m.step = steps[side]
            logits = last[id(m)]
            t0 = time.perf_counter()
            for _ in range(a.block):
                logits = m.decode(int(logits.argmax()))
            ms[side].append((time.perf_counter() - t0) / a.block * 1e3)
            last[id(m)] = logits
    iv = time_ratio(ms["B"], ms["A"])
    print(f"A ({a.a_env or a.artifact}) vs B ({a.b_artifact or 'unset'}): A median "
          f"{statistics.median(ms['A']):.3f} ms, B median "
          f"{statistics.median(ms['B']):.3f} ms; B / A {iv.est:.3f} "
          f"[{iv.lo:.3f}, {iv.hi:.3f}] ({iv.n} pairs of {a.block} steps, "
          f"{torch.backends.cpu.get_cpu_capability()}, {a.threads} thread(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
