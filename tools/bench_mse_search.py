"""Time the MSE range search on one weight: what ``freeze`` spends per MSE-estimated linear.

    python tools/bench_mse_search.py [--shape 4864 896] [--threads 1]

A random [out, in] weight (0.02 scale, every 97th row x 13th column scaled 30x: a few
outliers, as real weights have) searched with 100 candidates at 8 bits, per tensor,
per output channel and per group of 64, symmetric and asymmetric; prints seconds and a
hash of the chosen ranges (equal hashes: the same ranges) with the CPU capability.
4864 x 896 is Qwen2.5-Coder-0.5B's MLP projection.
"""

from __future__ import annotations

import argparse
import hashlib
import time

import torch

from qdsl.quant.search import mse_search


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=2, default=[4864, 896], metavar=("OUT", "IN"))
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*a.shape, generator=g) * 0.02
    w[::97, ::13] *= 30
    print(f"cpu {torch.backends.cpu.get_cpu_capability()}, {a.threads} thread(s), "
          f"weight {a.shape[0]} x {a.shape[1]}, 100 candidates, 8 bits")
    for name, v in (("per tensor", w.reshape(1, -1)), ("per channel", w),
                    ("groups of 64", w.reshape(-1, 64))):
        for symmetric in (True, False):
            lo, hi = v.min(1).values, v.max(1).values
            t0 = time.perf_counter()
            a_lo, a_hi = mse_search(v, lo, hi, 8, symmetric, 100)
            dt = time.perf_counter() - t0
            h = hashlib.sha1(torch.cat([a_lo, a_hi]).numpy().tobytes()).hexdigest()[:10]
            kind = "symmetric" if symmetric else "asymmetric"
            print(f"{name:<13} {kind:<11} {dt:7.3f} s  ranges {h}")


if __name__ == "__main__":
    main()
