"""Found vs uniform recipes: paired CIs (perplexity ratio, ES difference) and a Pareto plot.

    python tools/search_compare.py --row NAME=EVAL.json:SIZE_MB ... --pair FOUND:UNIFORM ... \
        --plot docs/search_pareto.png

Each EVAL.json is `qdsl eval ... --json` of one artifact (the same --n, --seed and
--ppl-windows for all, so samples and windows pair). SIZE_MB is the storage `qdsl search`
/ `qdsl explain` count. Prints a markdown table; the plot is size against perplexity.
The Pareto plot in docs/search.md (perplexity ratio to fp32 with CIs, sizes counted from
the recipes) is tools/search_pareto.py's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdsl.study.paired import es_diff  # noqa: E402
from qdsl.study.stats import ppl_ratio  # noqa: E402


def _row(path: str) -> dict:
    d = json.loads(Path(path).read_text())
    for key in ("target", "result", "model"):
        if isinstance(d.get(key), dict) and "samples" in d[key]:
            return d[key]
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--row", action="append", default=[], help="NAME=EVAL.json:SIZE_MB")
    ap.add_argument("--pair", action="append", default=[], help="FOUND:UNIFORM (row names)")
    ap.add_argument("--plot", help="PNG / SVG: size vs perplexity")
    args = ap.parse_args(argv)
    rows, sizes = {}, {}
    for spec in args.row:
        name, rest = spec.split("=", 1)
        path, size = rest.rsplit(":", 1)
        rows[name], sizes[name] = _row(path), float(size)
    print("| recipe | size MB | perplexity | ES |")
    print("|---|---:|---:|---:|")
    ppl = {}
    for name, r in rows.items():
        nll = r["ppl_window_nll"]
        ppl[name] = math.exp(sum(nll) / len(nll))
        print(f"| {name} | {sizes[name]:.2f} | {ppl[name]:.3f} | {r['es']:.2f} |")
    print()
    print("| found vs uniform | size MB | ppl ratio (95% CI) | ES diff (95% CI) |")
    print("|---|---:|---:|---:|")
    for spec in args.pair:
        a, b = spec.split(":")
        pr = ppl_ratio(rows[a]["ppl_window_nll"], rows[b]["ppl_window_nll"])
        es = es_diff(rows[a], rows[b])
        es_text = "-" if es is None else f"{es.est:+.2f} [{es.lo:+.2f}, {es.hi:+.2f}] (n={es.n})"
        print(f"| {a} vs {b} | {sizes[a]:.2f} vs {sizes[b]:.2f} | {pr.est:.4f} "
              f"[{pr.lo:.4f}, {pr.hi:.4f}] (n={pr.n} windows) | {es_text} |")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name in rows:
            found = name.startswith("found")
            ax.scatter(sizes[name], ppl[name], marker="o" if found else "s",
                       color="tab:red" if found else "tab:blue")
            ax.annotate(name, (sizes[name], ppl[name]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel("parameter storage (MB)")
        ax.set_ylabel("perplexity (stdlib test windows)")
        ax.set_title("qdsl search: found (circles) vs uniform (squares)")
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
