"""Issue 15's targets, one line per bench of ``tools/issue15_tables.sh``: reads its
``qdsl bench --json`` files and prints a markdown table (ms, and each ratio the issue
sets a target on, with the verdict), the CPU capability, threads and load beside it.

    python tools/issue15_summary.py runs/issue15/bench/*.json

Every ratio is between rows of the same bench run (the same process tree, rows
interleaved), so machines and runs are never mixed in one ratio. Rows a bench does
not have (no llama.cpp binary, no compiled decode) print as "-".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdsl.eval.hosting_report import _bandwidth, bound_ms  # noqa: E402


def _row(rows: list[dict], pred) -> dict | None:
    return next((r for r in rows if pred(r)), None)


def _ms(r: dict | None, key: str) -> str:
    if r is None:
        return "-"
    return f"{r[key]:.1f}" if key == "prefill_ms" else f"{r[key]:.2f}"


def _ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    return None if a is None or b is None else a[key] / b[key]


def _fmt(x: float | None, target: float | None = None, below: bool = True) -> str:
    if x is None:
        return "-"
    if target is None:
        return f"{x:.2f}x"
    ok = x <= target if below else x >= target
    return f"{x:.2f}x {'met' if ok else 'not met'}"


def summarize(path: Path) -> dict:
    d = json.loads(path.read_text())
    rows, cond = d["rows"], d["conditions"]
    bw = _bandwidth(d)      # the run's median read bandwidth, as the bench table uses
    art = [r for r in rows if r["kind"] == "artifact" or r["name"].startswith("qdsl ")]
    int8 = _row(art, lambda r: "w4" not in r["name"] and "compiled" not in r["name"])
    int8c = _row(art, lambda r: "w4" not in r["name"] and "compiled" in r["name"])
    w4only = lambda r: "w4" in r["name"] and "w4a8" not in r["name"]  # noqa: E731
    w4 = _row(art, lambda r: w4only(r) and "compiled" not in r["name"])
    w4c = _row(art, lambda r: w4only(r) and "compiled" in r["name"])
    w4a8 = _row(art, lambda r: "w4a8" in r["name"] and "compiled" not in r["name"])
    w4a8c = _row(art, lambda r: "w4a8" in r["name"] and "compiled" in r["name"])
    fp32 = _row(rows, lambda r: r["kind"] == "fp32")
    graph = _row(rows, lambda r: r["kind"] == "fp32-graph" and "compiled" not in r["name"])
    # torch.ao's dynamic int8 with GPT-2's Conv1D as Linear where the bench has that row
    tao = (_row(rows, lambda r: r["kind"] == "torch-ao-linear")
           or _row(rows, lambda r: r["kind"] == "torch-ao"))
    q8 = _row(rows, lambda r: r["kind"] == "llama.cpp" and "Q8_0" in r["name"])
    q4 = _row(rows, lambda r: r["kind"] == "llama.cpp" and "Q4_0" in r["name"])
    best8 = min((r for r in (int8, int8c) if r), key=lambda r: r["decode_ms"], default=None)
    best4 = min((r for r in (w4, w4c) if r), key=lambda r: r["decode_ms"], default=None)
    best4a8 = min((r for r in (w4a8, w4a8c) if r), key=lambda r: r["decode_ms"], default=None)
    cap = cond["capability"] + (" (forced AVX2)" if cond.get("forced_capability") else "")
    return {
        "model": d["model"], "cpu": f"{cap}, {cond['threads']} t",
        "load": f"{cond['load_avg'][0]:.1f}",
        "fp32 prefill / decode ms": f"{_ms(fp32, 'prefill_ms')} / {_ms(fp32, 'decode_ms')}",
        "fp32 graph decode vs eager": _fmt(_ratio(graph, fp32, "decode_ms"), 1.0),
        "torch.ao prefill / decode vs fp32": f"{_fmt(_ratio(tao, fp32, 'prefill_ms'))} / "
                                             f"{_fmt(_ratio(tao, fp32, 'decode_ms'))}",
        "int8 prefill vs fp32": _fmt(_ratio(int8, fp32, "prefill_ms"), 0.5),
        "int8 prefill vs Q8_0": _fmt(_ratio(int8, q8, "prefill_ms"), 1.0),
        "int8 decode ms (eager / compiled)": f"{_ms(int8, 'decode_ms')} / {_ms(int8c, 'decode_ms')}",
        "int8 decode / bound": _fmt(None if best8 is None else
                                    best8["decode_ms"] / bound_ms(best8, bw), 1.5),
        "int8 decode vs Q8_0": _fmt(_ratio(best8, q8, "decode_ms"), 1.0),
        "int8 decode vs torch.ao": _fmt(_ratio(best8, tao, "decode_ms")),
        "w4 decode ms (eager / compiled)": f"{_ms(w4, 'decode_ms')} / {_ms(w4c, 'decode_ms')}",
        "w4 decode vs Q4_0": _fmt(_ratio(best4, q4, "decode_ms"), 1.0),
        "w4a8 decode ms (eager / compiled)": f"{_ms(w4a8, 'decode_ms')} / "
                                             f"{_ms(w4a8c, 'decode_ms')}",
        "w4a8 decode vs Q4_0": _fmt(_ratio(best4a8, q4, "decode_ms"), 1.0),
        "Q8_0 / Q4_0 decode ms": f"{_ms(q8, 'decode_ms')} / {_ms(q4, 'decode_ms')}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="qdsl bench --json files")
    args = ap.parse_args()
    lines = [summarize(p) for p in sorted(args.files)]
    cols = list(lines[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for s in lines:
        print("| " + " | ".join(s[c] for c in cols) + " |")


if __name__ == "__main__":
    main()
