"""Microbenchmark of qdsl's decode attention (``qdsl_kernels.cached_decode_attention``)
as a decode step sees it: every layer's key/value cache read once, cold, from one
huge-page buffer (as ``hugepages.rehome`` lays out a compiled step's caches), one query
token, ``--keys`` cached positions.

    python tools/bench_attention.py [--model smollm2-135m] [--keys 528] [--threads 1]

Prints, per model shape: microseconds per layer (median over ``--repeats`` sweeps of all
layers), the cache bytes a layer reads, the rate that is, and its ratio to the same
run's read test (``torch.sum`` over 256 MB, ``qdsl bench``'s): 1.0 would be attention
at the bandwidth limit. ``--json PATH`` writes the figures. Separate processes with two
builds of the kernel (``TORCH_EXTENSIONS_DIR`` and ``PYTHONPATH`` per worktree) give an
A/B; ``--ab-pairs`` runs the child processes alternately (ABBA) and reports the
geometric mean ratio with its 95% t interval.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# (heads, key/value heads, head size, layers) of the models issue 15 reports
SHAPES = {"smollm2-135m": (9, 3, 64, 30), "qwen2.5-coder-0.5b": (14, 2, 64, 24),
          "gpt2": (12, 12, 64, 12)}


def measure(model: str, keys: int, threads: int, repeats: int, dtype: str,
            hot: bool = False) -> dict:
    import torch

    from qdsl.eval.hosting_hw import read_bandwidth_gbs
    from qdsl.runtime import hugepages
    from qdsl.runtime.kernels import cext
    from qdsl.runtime.kernels.cpu import capability
    torch.set_num_threads(threads)
    if not cext.load():
        raise SystemExit(f"qdsl's extension does not load: {cext.why_not()}")
    H, Hk, D, layers = SHAPES[model]
    L = keys + 64
    dt = getattr(torch, dtype)
    per = 2 * Hk * L * D * torch.tensor([], dtype=dt).element_size()
    buf = hugepages.huge_buffer(layers * per)
    if buf is None:
        buf = torch.empty(layers * per, dtype=torch.uint8)
    caches = buf[: layers * per].view(dt).view(layers, 2, 1, Hk, L, D)
    caches.copy_(torch.randn(caches.shape).to(dt))
    g = torch.Generator().manual_seed(0)
    qs = [torch.randn(1, H, 1, D, generator=g) for _ in range(layers)]
    pos = torch.tensor([keys - 1])
    mask = torch.zeros(1, 1, 1, L)
    isa = capability().isa
    op = torch.ops.qdsl_kernels.cached_decode_attention
    scale = D ** -0.5

    def sweep() -> float:
        t0 = time.perf_counter()
        for i in range(layers):
            c = 0 if hot else i
            op(qs[i], caches[c, 0], caches[c, 1], mask, pos, scale, isa)
        return (time.perf_counter() - t0) / layers * 1e6

    for _ in range(3):
        sweep()
    us = statistics.median(sweep() for _ in range(repeats))
    gbs = read_bandwidth_gbs(threads)
    read = 2 * Hk * keys * D * caches.element_size()
    return {"model": model, "keys": keys, "threads": threads, "dtype": dtype, "hot": hot,
            "us_per_layer": us, "bytes_per_layer": read, "gbs": read / us / 1e3,
            "read_test_gbs": gbs, "of_bound": us / (read / gbs / 1e3),
            "capability": torch.backends.cpu.get_cpu_capability()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--keys", type=int, default=528)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--hot", action="store_true",
                    help="every call reads layer 0's cache (in cache: the compute alone)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--ab-pairs", type=int, default=0,
                    help="alternate child processes: A with --a-path, B with --b-path")
    ap.add_argument("--a-path", help="PYTHONPATH of A (a worktree)")
    ap.add_argument("--b-path", help="PYTHONPATH of B")
    a = ap.parse_args(argv)
    if a.ab_pairs:
        return ab(a)
    r = measure(a.model, a.keys, a.threads, a.repeats, a.dtype, a.hot)
    if a.json is None:
        print(json.dumps(r))
    else:
        with open(a.json + ".tmp", "w") as f:
            json.dump(r, f, indent=1)
        os.replace(a.json + ".tmp", a.json)
    print(f"{r['model']} {r['dtype']} keys {r['keys']} threads {r['threads']} "
          f"({r['capability']}): {r['us_per_layer']:.1f} us/layer, "
          f"{r['bytes_per_layer'] / 1e3:.0f} KB, {r['gbs']:.1f} GB/s "
          f"(read test {r['read_test_gbs']:.1f}: {r['of_bound']:.2f}x of the bound)",
          file=sys.stderr)
    return 0


def ab(a) -> int:
    base = [sys.executable, os.path.abspath(__file__), "--model", a.model, "--keys",
            str(a.keys), "--threads", str(a.threads), "--repeats", str(a.repeats),
            "--dtype", a.dtype] + (["--hot"] if a.hot else [])

    def run(path: str) -> float:
        path = os.path.abspath(path)
        env = dict(os.environ, PYTHONPATH=path,
                   TORCH_EXTENSIONS_DIR=os.path.join(path, ".torch_ext_bench"))
        out = subprocess.run(base, env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout)["us_per_layer"]

    from qdsl.study.stats import time_ratio
    us = {"a": [], "b": []}
    for i in range(a.ab_pairs):
        for k in (("a", "b") if i % 2 == 0 else ("b", "a")):
            us[k].append(run(a.a_path if k == "a" else a.b_path))
        print(f"pair {i + 1}: A {us['a'][-1]:.1f} us, B {us['b'][-1]:.1f} us", file=sys.stderr)
    iv = time_ratio(us["b"], us["a"])
    print(json.dumps({"a_us": us["a"], "b_us": us["b"], "b_over_a": iv.est,
                      "ci95": [iv.lo, iv.hi], "pairs": iv.n}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
