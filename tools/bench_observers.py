"""Time one MSE observer's calibration batches: what ``calibrate`` spends per activation.

    python tools/bench_observers.py [--batches 32 128] [--dims 576 1536] [--threads 1]

Feeds ``--batches`` batches of [1, 256, d] activations (four distinct random tensors
cycled, each batch scaled a little so ranges grow) to an 8-bit symmetric per-tensor
``MSEObserver``, then reads its estimate; prints seconds per (d, batches) with the CPU
capability. 256 x 576 is SmolLM2-135M's hidden size at a 256-token window, 256 x 1536
its MLP's (fewer units than the 2^18-value reservoir per batch vs more).
"""

from __future__ import annotations

import argparse
import time

import torch

from qdsl.quant.observers import MSEObserver


def run(d: int, batches: int) -> float:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 256, d, generator=g) for _ in range(4)]
    o = MSEObserver(8, True)
    t0 = time.perf_counter()
    for t in range(batches):
        o(xs[t % 4] * (1 + 0.01 * t))
    o.ranges()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--dims", type=int, nargs="+", default=[576, 1536])
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"cpu {torch.backends.cpu.get_cpu_capability()}, {a.threads} thread(s)")
    for d in a.dims:
        for b in a.batches:
            print(f"d {d:5d}  batches {b:4d}  {run(d, b):.3f} s")


if __name__ == "__main__":
    main()
