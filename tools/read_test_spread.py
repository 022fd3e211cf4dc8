"""The read-bandwidth test's spread: the bound's old figure (median of 5 sums over one
256 MiB buffer) against the current one (``hosting_hw.read_bandwidth_gbs``: the highest
of 4 sums over each of 3 fresh buffers), each as the first call of a fresh process, as
``qdsl bench``'s children make it.

    python tools/read_test_spread.py --runs 8 --threads 1 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time, torch
from qdsl.eval.hosting_hw import read_bandwidth_gbs
threads, method = int(sys.argv[1]), sys.argv[2]
if method == "old":
    torch.set_num_threads(threads)
    x = torch.ones(256 * 2**20 // 4); x.sum(); ts = []
    for _ in range(5):
        t0 = time.perf_counter(); x.sum(); ts.append(time.perf_counter() - t0)
    print(json.dumps(x.numel() * 4 / statistics.median(ts) / 1e9))
else:
    print(json.dumps(read_bandwidth_gbs(threads)))
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    import torch
    out = {"capability": torch.backends.cpu.get_cpu_capability(), "rows": []}
    for t in a.threads:
        got = {"old": [], "new": []}
        for _ in range(a.runs):            # interleaved: the two methods see the same load
            for m in ("old", "new"):
                r = subprocess.run([sys.executable, "-c", CHILD, str(t), m], check=True,
                                   capture_output=True, text=True)
                got[m].append(json.loads(r.stdout.strip().splitlines()[-1]))
        for m, v in got.items():
            row = {"threads": t, "method": m, "gbs": [round(x, 1) for x in v],
                   "min": round(min(v), 1), "median": round(statistics.median(v), 1),
                   "max": round(max(v), 1), "spread": round(max(v) / min(v), 2)}
            out["rows"].append(row)
            print(f"{t} thread(s), {m}: {row['min']}-{row['max']} GB/s (median {row['median']}, "
                  f"max/min {row['spread']})")
    print(f"CPU capability {out['capability']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
