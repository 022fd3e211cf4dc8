"""Op-level cost of qdsl's one-pass fake-quant kernels against the torch maths they
replace (``fake_quantize``: torch's fused per-tensor kernel; per-token parameters of a
batch: the reference maths), on SmolLM2-sized activations, 1 thread by default.

  python tools/bench_fake_quant_ops.py [--threads T] [--repeats R]

Prints medians in microseconds and the CPU capability (``ATEN_CPU_CAPABILITY=avx2``
forces both torch and qdsl's kernels to AVX2).
"""

from __future__ import annotations

import argparse
import time

import torch

from qdsl.config.spec import ACTIVATION, PerToken
from qdsl.quant.primitives import choose_qparams, fake_quantize, reduce_range
from qdsl.runtime.kernels import cext
from qdsl.runtime.kernels.impls import _isa

SHAPES = ((8, 200, 576), (8, 200, 1536), (8, 1, 576))


def median_us(f, repeats: int) -> float:
    f()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not cext.load():
        raise SystemExit(f"qdsl's C++ kernels unavailable: {cext.why_not()}")
    isa = _isa()
    print(f"capability {torch.backends.cpu.get_cpu_capability()}, isa {isa}, {a.threads} thread(s)")
    ops = torch.ops.qdsl_kernels
    for shape in SHAPES:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        s, z = choose_qparams(x.min(), x.max(), 8, False)
        st_torch = median_us(lambda: fake_quantize(x, s, z, 8, False), a.repeats)
        st_qdsl = median_us(lambda: ops.fake_quant(x, s, z, -1, 0, 255, isa), a.repeats)

        def dynamic_torch():
            sc, zp = choose_qparams(*reduce_range(x, PerToken(), ACTIVATION), 8, True)
            return fake_quantize(x, sc, zp, 8, True)
        dy_torch = median_us(dynamic_torch, a.repeats)
        dy_qdsl = median_us(lambda: ops.dynamic_fake_quant(x, True, -127, 127, True, isa), a.repeats)
        print(f"{str(list(shape)):15s} static per tensor: torch {st_torch:8.0f} us, qdsl "
              f"{st_qdsl:6.0f} us ({st_torch / st_qdsl:5.1f}x) | dynamic per token: torch "
              f"{dy_torch:8.0f} us, qdsl {dy_qdsl:6.0f} us ({dy_torch / dy_qdsl:5.1f}x)")


if __name__ == "__main__":
    main()
