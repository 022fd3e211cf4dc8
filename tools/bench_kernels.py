"""Microbenchmarks of every candidate kernel of qdsl's kernel table
(``qdsl/runtime/kernels``), as ratios to float32 ``F.linear`` measured in the same
run (interleaved, medians), on SmolLM2-135M's shapes (``--shapes stdlib-gpt2``: the 1W8A
artifacts' shapes).

    .venv/bin/python tools/bench_kernels.py [--threads 1] [--repeats 20] [--compile]
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python tools/bench_kernels.py

Rows: each candidate (``eligible`` on this capability, or ``refused`` as a reference
path: measured anyway, to show why), plus comparison rows that the runtime does not
use: oneDNN's int8 linear through the x86 inductor ops (``onednn.qlinear_pointwise``,
u8 activations: exact only with VNNI), fbgemm's dynamic linear through the
deprecated ``torch.ao`` quantized tensors, and with ``--compile`` a dequant-fused
linear compiled by ``torch.compile`` (inductor, C++ backend). ``--table`` prints the
table the runtime chose (measuring it if not cached). Shapes: 576 -> 1536, 1536 -> 576
and the 49152-row tied head, at M = 1 (decode) and M = 512 (prefill; the head at M = 1 only).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from qdsl.runtime import kernels
from qdsl.runtime.kernels import impls

SHAPES = {"smollm2-135m": ((576, 1536), (1536, 576), (576, 49152)),
          # stdlib-gpt2 (d 256, MLP 1024, vocabulary 8192): the 1W8A artifacts' shapes
          "stdlib-gpt2": ((256, 768), (256, 1024), (1024, 256), (256, 8192))}


def comparison_rows(m: int, k: int, n: int, compile_: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    ws = torch.rand(n, generator=g) * 0.01
    x = torch.randn(m, k, generator=g)
    xu = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g)
    wf = w.float() * ws[:, None]
    out = {"fp32 F.linear": lambda: torch.nn.functional.linear(x, wf)}
    if hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise"):
        pw, zp = torch.ops.onednn.qlinear_prepack(w, None), torch.zeros(n, dtype=torch.long)
        out["(cmp) onednn.qlinear_pointwise u8 x s8"] = lambda: torch.ops.onednn.qlinear_pointwise(
            xu, 1.0, 128, pw, ws, zp, None, 1.0, 0, torch.float32, "none", [], "")
    with warnings.catch_warnings():  # torch.ao quantized tensors are deprecated
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(w, ws.double(), torch.zeros(n, dtype=torch.long), 0)
        fb = torch.ops.quantized.linear_prepack(qw, None)
    out["(cmp) fbgemm linear_dynamic (torch.ao, deprecated)"] = (
        lambda: torch.ops.quantized.linear_dynamic(x, fb, False))
    if compile_:
        fn = torch.compile(lambda x, w, s: torch.nn.functional.linear(x, w.float() * s[:, None]),
                           dynamic=False)
        out["(cmp) torch.compile dequant + linear (inductor)"] = lambda: fn(x, w, ws)
    return out


def candidate_rows(m: int, k: int, n: int, cap) -> dict:
    cls = kernels.shape_class(m)
    out = {}
    for op in ("w8a8", "w8", "w4", "w4a8", "w1", "w1a8"):
        ok = kernels.eligible(op, cls, cap, kernels.table().ext)
        for name in impls.IMPLS[op]:
            if name.startswith("qdsl_") and name not in ok:   # its extension did not build
                continue
            tag = "" if name in ok else " [refused: reference path]"
            out[f"{op} {name}{tag}"] = impls.bench_case(op, name, m, k, n)
    return out


def bench(fns: dict, repeats: int) -> dict:
    times = {name: [] for name in fns}
    with torch.inference_mode():
        for f in fns.values():
            f(), f()                                         # warm-up, prepacking, compile
        for _ in range(repeats):                             # interleaved: load drifts
            for name, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--prefill-m", type=int, default=512)
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="smollm2-135m",
                    help="the model whose linear shapes are timed (smollm2-135m)")
    ap.add_argument("--compile", action="store_true", help="add a torch.compile row (slow to build)")
    ap.add_argument("--table", action="store_true", help="print the runtime's kernel table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cap = kernels.capability()
    print(f"torch {torch.__version__}, capability {cap.describe()}, {args.threads} thread(s), "
          f"medians of {args.repeats}; C++ kernels: "
          f"{'yes' if kernels.table().ext else 'no (' + str(kernels.cext.why_not()) + ')'}\n")
    print("| M x K -> N | kernel | ms | vs fp32 |\n|---|---|---|---|")
    for k, n in SHAPES[args.shapes]:
        for m in (1, args.prefill_m):
            if m > 1 and n > 10000:
                continue
            fns = {**comparison_rows(m, k, n, args.compile), **candidate_rows(m, k, n, cap)}
            res = bench(fns, args.repeats if m == 1 else max(3, args.repeats // 5))
            base = res["fp32 F.linear"]
            for name, ms in res.items():
                print(f"| {m} x {k} -> {n} | {name} | {ms:.3f} | {ms / base:.2f}x |", flush=True)
    if args.table:
        print()
        for line in kernels.summary_lines(kernels.report()):
            print(line)


if __name__ == "__main__":
    main()
