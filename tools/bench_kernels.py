"""Microbenchmarks of the CPU kernels behind qdsl's runtime modules, as ratios to
fp32 ``F.linear`` measured in the same run (interleaved, medians).

    .venv/bin/python tools/bench_kernels.py [--threads 1] [--repeats 50]

Shapes: GPT-2 124M's MLP up-projection (768 -> 3072) at decode (M = 1) and
prefill (M = 512), plus the tied lm_head (768 -> 50257) at M = 1.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from qdsl.runtime import Int8DynamicLinear, Int8WeightOnlyLinear, PackedLinear
from qdsl.runtime.int8 import prepack_int8
from qdsl.runtime.packed import weight_spec


def kernels(m: int, k: int, n: int) -> dict:
    """name -> zero-argument callable computing [m, k] @ [n, k]^T in that way."""
    w, x = torch.randn(n, k) * 0.05, torch.randn(m, k)
    dyn = Int8DynamicLinear.from_float(w)
    wq, ws = dyn.weight, dyn.weight_scale
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    packed = prepack_int8(wq, ws, None)
    wo, wo32 = Int8WeightOnlyLinear.from_float(w), Int8WeightOnlyLinear.from_float(w)
    wo32.compute_dtype = "fp32"
    out = {
        "fp32 F.linear": lambda: torch.nn.functional.linear(x, w),
        "bf16 F.linear (weights bf16)": (lambda wb=w.bfloat16(), xb=x.bfloat16():
                                         torch.nn.functional.linear(xb, wb)),
        "_int_mm only (int8 in, int32 out)": lambda: torch._int_mm(xq, wq.t()),
        "fbgemm linear_dynamic (incl. act quant)": (
            lambda: torch.ops.quantized.linear_dynamic(x, packed, False)),
        "Int8DynamicLinear (module)": lambda: dyn(x),
        "Int8DynamicLinear _int_mm path": lambda: _int_mm_path(dyn, x),
        "Int8WeightOnlyLinear bf16 (module)": lambda: wo(x),
        "Int8WeightOnlyLinear fp32 dequant": lambda: wo32(x),
    }
    if m <= 4:
        out["_weight_int8pack_mm fp32 input"] = (
            lambda: torch.ops.aten._weight_int8pack_mm(x, wq, ws))
    packed = PackedLinear.from_float(w, None, weight_spec(4, 64))
    out["PackedLinear w4 group 64 (module, int4 kernel bf16)"] = lambda: packed(x)
    if n <= 4096:
        exact = PackedLinear.from_float(w, None, weight_spec(4, 64))
        exact.compute_dtype = "fp32"
        out["PackedLinear w4 group 64 fp32 (unpack per call)"] = lambda: exact(x)
        if m == 1:
            w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
            sz = torch.rand(k // 64, n, 2)
            out["aten._weight_int4pack_mm_for_cpu g64 fp32 input"] = (
                lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w4, 64, sz))
    return out


def _int_mm_path(dyn: Int8DynamicLinear, x: torch.Tensor) -> torch.Tensor:
    """The M > 1 path of Int8DynamicLinear, forced at any M (per-token quant + _int_mm)."""
    return dyn.forward(x.expand(2, *x.shape))[0] if x.shape[0] == 1 else dyn(x)


def bench(fns: dict, repeats: int) -> dict:
    times = {name: [] for name in fns}
    with torch.inference_mode():
        for f in fns.values():
            f(), f()                                         # warm-up, fbgemm prepack
        for _ in range(repeats):                             # interleaved: load drifts
            for name, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
    print(f"torch {torch.__version__}, {args.threads} thread(s), medians of {args.repeats}\n")
    print("| shape (M x K -> N) | kernel | ms | vs fp32 |\n|---|---|---|---|")
    for m, k, n in ((1, 768, 3072), (512, 768, 3072), (1, 768, 50257)):
        res = bench(kernels(m, k, n), args.repeats if m == 1 else max(5, args.repeats // 5))
        base = res["fp32 F.linear"]
        for name, ms in res.items():
            print(f"| {m} x {k} -> {n} | {name} | {ms:.3f} | {ms / base:.2f}x |")


if __name__ == "__main__":
    main()
