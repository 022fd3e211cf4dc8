"""Figures for the compile pipeline (docs/compile.md): fidelity and cost of fake-quant.

    .venv/bin/python tools/bench_compile.py fidelity --model smollm2-135m
    .venv/bin/python tools/bench_compile.py speed            # 124M GPT-2, random weights

fidelity: perplexity on held-out windows (the stdlib's test/ tree) of the float model
and of recipes compiled with calibration on the stdlib's non-test sources; max |logit|
difference and top-1 agreement against fp32.
speed: capture + calibration time for 128 windows of 256 tokens (W8A8) on a 124M
GPT-2, and the fake-quant forward's cost as a ratio to the fp32 graph's, measured in
the same run (medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

import qdsl
from qdsl.models.calib import CalibSpec, calibration_windows
from qdsl.graph.capture import capture
from qdsl.runtime.graphlm import GraphLM
from qdsl.models.lm import HFCausalLM
from qdsl.models.zoo import load_model

RECIPES = {
    "w16a16": "* -> w16a16\n",
    "w16a16 dynamic": "* -> w16a16 dynamic\n",
    "w8a8": "* -> w8a8\n",
    "w8a8, lm_head float": "* -> w8a8\nlm_head -> skip\n",
    "storti base (W8A8 MSE/CMM)": "include \"storti/base.qrec\"\nlm_head? -> skip\n",
    "storti base + res_sum a16": "include \"storti/base.qrec\"\nblock.*.res_sum -> a16\n"
                                 "lm_head? -> skip\n",
}


def perplexity(logits_fn, windows: torch.Tensor) -> float:
    nll, n = 0.0, 0
    for w in windows:
        logits = logits_fn(w[None])[0, :-1]
        nll += torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").item()
        n += len(w) - 1
    return float(torch.tensor(nll / n).exp())


def fidelity(args) -> dict:
    model, tok = load_model(args.model)
    held = calibration_windows(CalibSpec(str(Path(sysconfig.get_paths()["stdlib"]) / "test"),
                                         samples=args.eval_windows, seq_len=256, seed=1), tok)
    fp = HFCausalLM(model)
    ref = [fp.logits(w[None]) for w in held]
    out = {"model": args.model, "eval_windows": len(held), "calib_windows": args.samples,
           "fp32_ppl": perplexity(fp.logits, held), "rows": []}
    print(f"fp32 perplexity {out['fp32_ppl']:.3f} on {len(held)} held-out windows", file=sys.stderr)
    for name, text in RECIPES.items():
        if args.recipes and name not in args.recipes:
            continue
        t = time.perf_counter()
        qm = qdsl.compile(model, text, calib="stdlib", tokenizer=tok,
                          settings=qdsl.config.recipe.Settings(calib_samples=args.samples,
                                                        calib_seq_len=256))
        secs = time.perf_counter() - t
        lm = qm.lm()
        diffs, agree = [], []
        for w, r in zip(held, ref):
            q = lm.logits(w[None])
            diffs.append((q - r).abs().max().item())
            agree.append((q.argmax(-1) == r.argmax(-1)).float().mean().item())
        row = {"recipe": name, "ppl": perplexity(lm.logits, held), "compile_s": secs,
               "max_abs_logit_diff": max(diffs), "top1_agreement": statistics.mean(agree)}
        out["rows"].append(row)
        print(json.dumps(row), file=sys.stderr)
    return out


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def speed(args) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(attn_implementation="eager")).eval()
    calib = torch.randint(0, model.config.vocab_size, (args.samples, 256))
    t = time.perf_counter()
    cap = capture(model, mode="generate", max_cache_len=1024)
    capture_s = time.perf_counter() - t
    t = time.perf_counter()
    qm = qdsl.compile(model, "* -> w8a8\n", calib=calib)
    compile_s = time.perf_counter() - t
    ids = calib[:1]
    fp_graph, fq_graph = GraphLM(cap.gm, 1024).logits, qm.lm().logits
    with torch.inference_mode():
        fp_s = _median_time(lambda: fp_graph(ids), args.repeats)
        fq_s = _median_time(lambda: fq_graph(ids), args.repeats)
    return {"model": "gpt2-124m random", "calib_windows": args.samples, "seq_len": 256,
            "capture_s": capture_s, "compile_w8a8_s": compile_s, "fp32_forward_s": fp_s,
            "fake_w8a8_forward_s": fq_s, "fake_over_fp32": fq_s / fp_s,
            "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=["fidelity", "speed"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--samples", type=int, default=128, help="calibration windows of 256 tokens")
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--recipes", nargs="*", help=f"subset of {list(RECIPES)}")
    p.add_argument("--json", help="write the result here too")
    args = p.parse_args()
    result = fidelity(args) if args.what == "fidelity" else speed(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
