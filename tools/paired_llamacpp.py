"""Decode speed of a qdsl artifact against llama.cpp, paired block by block.

``qdsl bench`` runs each side once (its rows minutes apart): on a shared host a 3% tie
cannot be told from load that came and went between them. This script alternates
blocks in one session (ABBA order): a block of qdsl is a prefill of ``--context``
random tokens and ``--decode-tokens`` timed decode steps of the compiled (or eager)
step (``qdsl bench --compile-decode``'s: one fused C++ call a step for a w8a8 / w4a8
LLaMA artifact, else inductor's compiled step); a block of llama.cpp is one
``llama-bench -p 0 -n N -d CONTEXT -r 1`` run of the GGUF. Each side's figure is ms/token
as a mean over the block's tokens (what llama-bench reports). The verdict is the
geometric mean of the per-pair ratios qdsl / llama.cpp with its 95% t interval on the
log ratios: "faster" or "slower" only where the interval excludes 1.

    python tools/paired_llamacpp.py ARTIFACT --llamacpp BIN --gguf Q8_0.gguf \\
        --threads 1 --context 512 --decode-tokens 32 --pairs 12 --json OUT.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from qdsl.atomic.files import write_json_atomic
from qdsl.compiler.loading import load_artifact_lm
from qdsl.eval import hosting_hw
from qdsl.runtime.fused import decode_step
from qdsl.study.stats import time_ratio


def qdsl_block(lm, ids: torch.Tensor, tokens: int) -> float:
    """ms/token: the mean over ``tokens`` greedy decode steps after prefilling ``ids``."""
    logits = lm.prefill(ids)
    t0 = time.perf_counter()
    for _ in range(tokens):
        logits = lm.decode(int(logits.argmax()))
    return (time.perf_counter() - t0) / tokens * 1e3


def llama_block(binary: str, gguf: str, context: int, tokens: int, threads: int) -> float:
    tg = hosting_hw._llama_bench(binary, gguf, ["-p", "0", "-n", str(tokens), "-d",
                                                str(context), "-t", str(threads)], 1)
    return 1e3 / tg["avg_ts"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--llamacpp", required=True, help="llama-bench binary")
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--cache-len", type=int, default=1024,
                    help="the graph's cache slots (qdsl bench's default)")
    ap.add_argument("--eager", action="store_true", help="decode eager, not compiled")
    ap.add_argument("--json", help="write the blocks and the verdict here")
    a = ap.parse_args(argv)
    hosting_hw.check_llamacpp(a.llamacpp, [a.gguf])
    torch.set_num_threads(a.threads)
    lm = load_artifact_lm(a.artifact, max_cache_len=a.cache_len)
    lm.step = None if a.eager else decode_step(lm.gm, lm.name)
    ids = torch.randint(0, 1000, (1, a.context), generator=torch.Generator().manual_seed(0))
    qdsl_block(lm, ids[:, :8], 3)                    # compile (or warm) the step
    if lm.step is not None and lm.step.failed:
        print(f"compiling failed: {lm.step.failed}", file=sys.stderr)
        return 1
    step = "eager" if lm.step is None else (
        "fused" if getattr(lm.step, "active", False) else "compiled")
    print(f"qdsl decodes with the {step} step", flush=True)
    machine = hosting_hw.machine(a.threads)
    blocks = []
    for i in range(a.pairs):
        order = ("qdsl", "llama") if i % 4 in (0, 3) else ("llama", "qdsl")   # ABBA
        pair = {}
        for side in order:
            pair[side] = (qdsl_block(lm, ids, a.decode_tokens) if side == "qdsl" else
                          llama_block(a.llamacpp, a.gguf, a.context, a.decode_tokens,
                                      a.threads))
        blocks.append(pair)
        print(f"pair {i + 1}/{a.pairs}: qdsl {pair['qdsl']:.2f} ms/token, "
              f"llama.cpp {pair['llama']:.2f}", flush=True)
    iv = time_ratio([p["qdsl"] for p in blocks], [p["llama"] for p in blocks])
    ratio, lo, hi = iv.est, iv.lo, iv.hi
    verdict = ("faster" if hi < 1 else "slower" if lo > 1 else "inconclusive")
    out = {"artifact": a.artifact, "gguf": Path(a.gguf).name, "threads": a.threads,
           "context": a.context, "decode_tokens": a.decode_tokens, "compiled": not a.eager,
           "step": step,
           "machine": machine, "blocks": blocks,
           "qdsl_median_ms": statistics.median(p["qdsl"] for p in blocks),
           "llama_median_ms": statistics.median(p["llama"] for p in blocks),
           "ratio": ratio, "ci95": [lo, hi], "verdict": verdict}
    print(f"qdsl / llama.cpp ms per token: {ratio:.3f} [{lo:.3f}, {hi:.3f}] "
          f"({len(blocks)} pairs, {machine['capability']}, {a.threads} thread(s), {step} "
          "step): "
          f"qdsl {verdict}")
    if a.json:
        write_json_atomic(a.json, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
