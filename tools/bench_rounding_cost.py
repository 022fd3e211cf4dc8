"""CPU seconds of GPTQ / AWQ / RTN rounding on Qwen2.5-Coder-0.5B's seven linear shapes.

    python tools/bench_rounding_cost.py > cost.json

Random weights (std 0.02) and a Hessian from 2,048 synthetic tokens: the rounding's cost
depends on the shapes, not the values. Process CPU time (``time.process_time``), one
torch thread, so the figure does not depend on how many other jobs share the machine.
Spec: w4 symmetric, groups of 128, min-max; GPTQ with act_order, AWQ with clip (the
recipes/algorithms/ settings). Prints one JSON object: seconds per linear and method.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import torch

from qdsl.config.base import WEIGHT
from qdsl.config.rounding import AWQ, GPTQ
from qdsl.config.spec import GroupWise, TensorSpec
from qdsl.quant.awq import awq_codes
from qdsl.quant.gptq import gptq_codes
from qdsl.quant.weights import rtn_codes

# Qwen2.5-Coder-0.5B: hidden 896, 14 query / 2 KV heads of 64, MLP 4864; [out, in]
SHAPES = {"q": (896, 896), "k": (128, 896), "v": (128, 896), "o": (896, 896),
          "gate": (4864, 896), "up": (4864, 896), "down": (896, 4864)}


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = TensorSpec(kind=WEIGHT, bits=4, symmetric=True, granularity=GroupWise(128))
    out: dict = {"cpu": torch.backends.cpu.get_cpu_capability(), "threads": 1}
    for name, (o, i) in SHAPES.items():
        x = torch.randn(2048, i)
        h = 2 * x.T @ x / 2048
        w = torch.randn(o, i) * 0.02
        row = {}
        for label, spec in (("rtn", base), ("gptq", replace(base, rounding=GPTQ(act_order=True))),
                            ("awq", replace(base, rounding=AWQ(clip=True)))):
            t = time.process_time()
            if label == "rtn":
                rtn_codes(w, spec)
            elif label == "gptq":
                gptq_codes(w, h, spec)
            else:
                awq_codes(w, h, x.abs().mean(0), spec)
            row[label] = round(time.process_time() - t, 2)
        out[name] = row
    print(json.dumps(out))


if __name__ == "__main__":
    main()
