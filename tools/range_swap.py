"""Which static activation ranges make two calibrations of one recipe differ: swap the
named activations' ranges (scale, zero point) between two saved artifacts and score
perplexity on the same windows, paired per window.

Written for Wei et al.'s Fig. 7 on Qwen2.5-Coder (docs/results-qwen.md): static
per-column W8A8 calibrated on 2048 windows scored worse perplexity than on 512, and
one activation's range moved most (block 21's `mlp.mul`, the down projection's input:
a 5.1x larger scale). Rows, all on the first WINDOWS of the sweep's perplexity windows:
A, B, B with A's ranges at NAMES, A with B's ranges at NAMES. Prints the 20 largest
scale ratios B / A, then each row's perplexity and its ratio against A and B with the
t interval of the per-window log-losses (``qdsl.study.stats.ppl_ratio``).

    .venv/bin/python tools/range_swap.py results/sweep-qwen/artifacts/5db7ff5e7928d2db \\
        results/sweep-qwen/artifacts/2bb0b14be4c8c560 block.21.mlp.mul --windows 48 \\
        --json results/sweep-qwen/fig7_range_swap.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import qdsl
from qdsl.atomic import write_json_atomic
from qdsl.eval.complete import score_perplexity
from qdsl.eval.samples import load_bench
from qdsl.study.stats import ppl_ratio
from qdsl.study.sweepjob import _model

PARAMS = "quant_params.safetensors"


def _swapped(src: Path, donor: Path, names: list[str], out: Path) -> Path:
    """A copy of artifact ``src`` whose activations ``names`` carry ``donor``'s range
    tensors (its manifest's hash and size updated to the new parameters file)."""
    shutil.copytree(src, out)
    params, given = load_file(src / PARAMS), load_file(donor / PARAMS)
    for n in names:
        keys = [k for k in params if k.startswith(f"act.{n}.")]
        if not keys:
            raise SystemExit(f"{src}: no activation range named {n!r}")
        params.update({k: given[k] for k in keys})
    save_file(params, str(out / PARAMS))
    man = json.loads((out / "qdsl_artifact.json").read_text())
    data = (out / PARAMS).read_bytes()
    man["files"][PARAMS] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (out / "qdsl_artifact.json").write_text(json.dumps(man, indent=1))
    return out


def _scale_ratios(a: Path, b: Path, top: int = 20) -> list[tuple[float, str, float, float]]:
    pa, pb = load_file(a / PARAMS), load_file(b / PARAMS)
    rows = [(float(pb[k]) / float(pa[k]), k[4:-6], float(pa[k]), float(pb[k]))
            for k in pa if k.startswith("act.") and k.endswith(".scale") and pa[k].numel() == 1]
    rows.sort(key=lambda r: -abs(math.log(r[0])))
    return rows[:top]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path, help="artifact A (e.g. 512 calibration windows)")
    ap.add_argument("b", type=Path, help="artifact B (e.g. 2048 calibration windows)")
    ap.add_argument("names", nargs="+", help="activations to swap (block.21.mlp.mul)")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--windows", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("largest activation scale ratios B / A:")
    ratios = _scale_ratios(args.a, args.b)
    for r, name, sa, sb in ratios:
        print(f"  {r:7.3f}  {name}  {sa:.4g} -> {sb:.4g}")
    loaded = _model(args.model)
    samples = load_bench("stdlib", max(20, args.windows), 0)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        arts = {"A": args.a, "B": args.b,
                "B, names from A": _swapped(args.b, args.a, args.names, Path(tmp) / "b_a"),
                "A, names from B": _swapped(args.a, args.b, args.names, Path(tmp) / "a_b")}
        for label, art in arts.items():
            qm = qdsl.load(art, loaded.model, batch_size=args.batch_size)
            lm = qm.lm(name=label)
            p = score_perplexity(lm, loaded.tok, samples, args.windows, window=256,
                                 batch_size=args.batch_size, progress=True)
            rows[label] = p
            print(f"{label}: ppl {p['ppl']:.3f} ({p['seconds']:.0f} s)", flush=True)
            del qm, lm
    out = {"a": str(args.a), "b": str(args.b), "names": args.names, "windows": args.windows,
           "cpu": torch.backends.cpu.get_cpu_capability(), "threads": 1,
           "scale_ratios": [{"name": n, "a": sa, "b": sb, "b_over_a": r}
                            for r, n, sa, sb in ratios], "rows": {}}
    for label, p in rows.items():
        row = {"ppl": p["ppl"]}
        for ref in ("A", "B"):
            if ref != label:
                iv = ppl_ratio(p["window_nll"], rows[ref]["window_nll"])
                row[f"vs {ref}"] = [iv.est, iv.lo, iv.hi]
        out["rows"][label] = row
        print(f"{label:16s} ppl {p['ppl']:.3f}  " + "  ".join(
            f"{k} x{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for k, v in row.items() if k != "ppl"))
    if args.json:
        write_json_atomic(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
