"""What the online Hadamard costs at decode: the same rotated int8 artifact with its
``OnlineHadamard`` modules running, and made the identity, against the unrotated
artifact of the same recipe; decode steps interleaved one by one in one process (the
order rotating every step), so the variants share the machine's load; the median of the
paired per-step ratios is reported with its interquartile range.

    python tools/bench_online_hadamard.py --base ART_UNROTATED --rotated ART_ROTATED \\
        [--old FILE.py] --json OUT.json

``--old``: a module file with an ``apply_hadamard(x, n)`` to time as a fourth row (e.g.
an earlier ``qdsl/quant/hadamard.py`` from git: ``git show REV:qdsl/quant/hadamard.py``).
Records the CPU capability and threads with the figures (docs/algorithms.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="artifact of the recipe without rotate")
    p.add_argument("--rotated", required=True, help="artifact of the recipe with rotate")
    p.add_argument("--old", help="a module file with another apply_hadamard to time too")
    p.add_argument("--context", type=int, default=256, help="tokens prefilled before decode")
    p.add_argument("--steps", type=int, default=48, help="decode steps per repeat")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    args = p.parse_args()

    import qdsl.runtime.hadamard as online
    from qdsl.compiler.loading import load_artifact_lm

    torch.set_num_threads(args.threads)
    cache = args.context + args.steps + 2
    base = load_artifact_lm(args.base, max_cache_len=cache)
    rot = load_artifact_lm(args.rotated, max_cache_len=cache)
    new_apply = online.apply_hadamard
    variants = {"unrotated": (base, new_apply), "rotated": (rot, new_apply),
                "rotated, Hadamard as identity": (rot, lambda x, n: x)}
    if args.old:
        spec = importlib.util.spec_from_file_location("old_hadamard", args.old)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        variants["rotated, --old apply_hadamard"] = (rot, old.apply_hadamard)
    ids = torch.randint(0, 1000, (1, args.context), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for lm in (base, rot):
            lm.prefill(ids)
        order = list(variants.items())
        for step in range(args.steps):
            pos = rot._pos          # the rotated variants decode the same position in turn
            k = step % len(order)   # and each variant takes every place in the order
            for name, (lm, fn) in order[k:] + order[:k]:
                online.apply_hadamard = fn
                if lm is rot:
                    rot._pos = pos
                t0 = time.perf_counter()
                lm.decode(5)
                times[name].append(time.perf_counter() - t0)
    online.apply_hadamard = new_apply
    ref = times["unrotated"]
    rows = {}
    for name, ts in times.items():
        ratios = sorted(b / a for a, b in zip(ref, ts))
        rows[name] = {"decode_ms_median": 1e3 * statistics.median(ts),
                      "paired_ratio_median": ratios[len(ratios) // 2],
                      "paired_ratio_iqr": [ratios[len(ratios) // 4], ratios[3 * len(ratios) // 4]]}
    out = {"base": args.base, "rotated": args.rotated, "context": args.context,
           "steps": args.steps * args.repeats, "threads": torch.get_num_threads(),
           "cpu": torch.backends.cpu.get_cpu_capability(),
           "load_avg": list(os.getloadavg()), "rows": rows}
    print("| variant | decode ms/token (median) | per-step ratio to unrotated: median [IQR] |")
    print("|---|---:|---:|")
    for name, r in rows.items():
        lo, hi = r["paired_ratio_iqr"]
        print(f"| {name} | {r['decode_ms_median']:.2f} | {r['paired_ratio_median']:.3f} "
              f"[{lo:.3f}, {hi:.3f}] |")
    print(f"CPU capability {out['cpu']}, {out['threads']} thread(s), load average "
          f"{', '.join(f'{x:.1f}' for x in out['load_avg'])}")
    if args.json:
        from qdsl.atomic import write_json_atomic
        write_json_atomic(args.json, out)


if __name__ == "__main__":
    main()
