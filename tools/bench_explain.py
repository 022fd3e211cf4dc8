"""How long `qdsl explain` takes on a 124M-parameter GPT-2 (CodeGPT-small shape,
random weights from GPT2Config()), capture included; the target is < 10 s.

    .venv/bin/python tools/bench_explain.py [--repeats 3]

Times the whole command as a user runs it (a fresh process, model loaded from a saved
checkpoint directory) and, in-process, the phases: capture, naming, matching.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from qdsl.graph.capture import capture
from qdsl.lang import load_recipe
from qdsl.graph.naming import name_graph
from qdsl.plan import build_plan
from qdsl.resources import data_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    recipe = data_dir("recipes") / "card.qrec"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(attn_implementation="eager")).eval()
    phases = {"capture": [], "name": [], "match": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        cap = capture(model, mode="plain")
        t1 = time.perf_counter()
        named = name_graph(cap)
        t2 = time.perf_counter()
        build_plan(load_recipe(recipe), named)
        t3 = time.perf_counter()
        for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
            phases[k].append(v)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        cli = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "qdsl.cli", "explain", str(recipe),
                                "--model", d], capture_output=True, text=True)
            cli.append(time.perf_counter() - t)
            assert r.returncode == 0, r.stderr[-2000:]
    out = {"model": "gpt2-124m random", "nodes": len(named.nodes),
           **{f"{k}_s": statistics.median(v) for k, v in phases.items()},
           "cli_total_s": statistics.median(cli), "cli_runs_s": cli,
           "threads": torch.get_num_threads()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
