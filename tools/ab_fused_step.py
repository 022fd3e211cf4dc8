"""Paired A/B in one process: the compiled decode step (A, ``compiled.CompiledStep``)
against the fused one (B, ``fused.FusedStep``: ``llama_decode_step``, one parallel
region a step), on one artifact, one graph and one key/value cache.

After one prefill of ``--context`` tokens they alternate blocks of ``--block`` decode
steps (ABBA), each block's figure its mean ms/token; the result is the geometric mean
of the ratios B / A with its 95% t interval (``qdsl.study.stats.time_ratio``), with the
CPU capability and threads. ``--agree N`` also decodes N greedy tokens from four
random prompts with the eager graph, the compiled step and the fused one and reports,
per prompt, how many leading tokens of each equal the eager graph's.

    python tools/ab_fused_step.py ARTIFACT --threads 2 --pairs 40
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python tools/ab_fused_step.py ARTIFACT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from qdsl.compiler.loading import load_artifact_lm
from qdsl.runtime.compiled import CompiledStep
from qdsl.runtime.fused import FusedStep
from qdsl.study.stats import time_ratio


def _greedy(lm, step, prompt: torch.Tensor, n: int) -> list[int]:
    lm.step = step
    logits = lm.prefill(prompt)
    out = []
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = lm.decode(out[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--cache-len", type=int, default=1024)
    ap.add_argument("--agree", type=int, default=0, help="greedy tokens per agreement prompt")
    ap.add_argument("--json", help="write the result here")
    a = ap.parse_args(argv)
    if a.context + 2 * a.block * a.pairs + 8 >= a.cache_len:
        ap.error("context + 2 * block * pairs must fit the cache (--cache-len)")
    torch.set_num_threads(a.threads)
    lm = load_artifact_lm(a.artifact, max_cache_len=a.cache_len)
    steps = {"A": CompiledStep(lm.gm, "compiled"),
             "B": FusedStep(lm.gm, lambda: None, "fused")}
    ids = torch.randint(0, 1000, (1, a.context), generator=torch.Generator().manual_seed(0))
    for side, step in steps.items():     # compile / check each once
        lm.step = step
        logits = lm.prefill(ids[:, :8])
        for _ in range(2):
            logits = lm.decode(int(logits.argmax()))
    if steps["A"].failed or not steps["B"].active:
        print(f"compiled: {steps['A'].failed or 'ok'}; fused: {steps['B'].why or 'ok'}",
              file=sys.stderr)
        return 1
    agree = None
    if a.agree:
        # per prompt: how many leading greedy tokens equal the eager graph's
        agree = {"compiled": [], "fused": []}
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            prompt = torch.randint(0, 1000, (1, 64), generator=g)
            eager = _greedy(lm, None, prompt, a.agree)
            for side, key in (("A", "compiled"), ("B", "fused")):
                toks = _greedy(lm, steps[side], prompt, a.agree)
                agree[key].append(next((i for i, (x, y) in enumerate(zip(toks, eager))
                                        if x != y), a.agree))
    lm.step = steps["A"]
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
    result = {"artifact": a.artifact, "threads": a.threads, "context": a.context,
              "cpu": torch.backends.cpu.get_cpu_capability(), "pairs": a.pairs,
              "block": a.block, "compiled_ms": statistics.median(ms["A"]),
              "fused_ms": statistics.median(ms["B"]), "ratio": iv.est, "lo": iv.lo,
              "hi": iv.hi, "agree": agree, "wrapper": steps["A"].wrapper,
              "ms": ms}
    print(f"compiled {result['compiled_ms']:.3f} ms, fused {result['fused_ms']:.3f} ms a "
          f"token; fused / compiled {iv.est:.3f} [{iv.lo:.3f}, {iv.hi:.3f}] ({iv.n} pairs of "
          f"{a.block} steps, context {a.context}, {result['cpu']}, {a.threads} thread(s))"
          + (f"; leading greedy tokens equal to eager's (of {a.agree}, per prompt): "
             f"compiled {agree['compiled']}, fused {agree['fused']}" if agree else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
