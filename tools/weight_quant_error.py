"""Per-linear 8-bit weight error of a model: symmetric min-max with one scale per tensor
against one scale per output row (Wei et al.'s per-tensor and per-column weights). For
each linear: the relative Frobenius error ||Q(W) - W|| / ||W|| of both, and max|W| over
the median of the rows' max|W| (how far one row's range stretches a per-tensor grid).

    .venv/bin/python tools/weight_quant_error.py qwen2.5-coder-0.5b --top 15 \\
        --json results/qwen-static-decomp/weight_error.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from qdsl.atomic import write_json_atomic
from qdsl.config.spec import WEIGHT, MinMax, PerChannel, PerTensor, TensorSpec
from qdsl.models.zoo import load_model
from qdsl.quant.weights import dequantize_codes, rtn_codes

# what `w8 sym per_tensor minmax` and `w8 sym per_channel minmax` compile to
PER_TENSOR = TensorSpec(WEIGHT, 8, symmetric=True, granularity=PerTensor(), observer=MinMax())
PER_ROW = TensorSpec(WEIGHT, 8, symmetric=True, granularity=PerChannel(), observer=MinMax())


def _error(w: torch.Tensor, spec: TensorSpec) -> float:
    """||Q(w) - w|| / ||w|| with qdsl's round to nearest on ``spec``'s grid."""
    q, scale, zero_point = rtn_codes(w, spec)
    return float((dequantize_codes(q, spec, scale, zero_point) - w).norm() / w.norm())


@torch.no_grad()
def weight_errors(model: torch.nn.Module) -> list[dict]:
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            w = m.weight.float()
            row_max = w.abs().amax(1)
            rows.append({"name": name, "shape": list(w.shape),
                         "per_tensor": _error(w, PER_TENSOR), "per_row": _error(w, PER_ROW),
                         "max_over_median_row_max": float(w.abs().max() / row_max.median())})
    return sorted(rows, key=lambda r: -r["per_tensor"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--json")
    args = ap.parse_args()
    model, _ = load_model(args.model)
    rows = weight_errors(model)
    for r in rows[:args.top]:
        print(f"{r['name']:40s} {str(r['shape']):14s} per-tensor {r['per_tensor']:.4f}  "
              f"per-row {r['per_row']:.4f}  max / median row max "
              f"{r['max_over_median_row_max']:.1f}")
    med_t = statistics.median(r["per_tensor"] for r in rows)
    med_r = statistics.median(r["per_row"] for r in rows)
    print(f"{len(rows)} linears; median relative error per-tensor {med_t:.4f}, per-row {med_r:.4f}")
    if args.json:
        write_json_atomic(args.json, {"model": args.model, "median_per_tensor": med_t,
                                      "median_per_row": med_r, "linears": rows})


if __name__ == "__main__":
    main()
