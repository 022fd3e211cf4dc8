"""Measure the transform recipes of recipes/algorithms/ against fp32 on one model, paired.

    python tools/bench_algorithms.py --model smollm2-135m --n 100 --ppl-windows 64 \\
        --out results/algorithms-smollm2
    python tools/bench_algorithms.py --out results/algorithms-smollm2 --report

Every recipe is compiled (``--lower``, default fake: the same arithmetic as the int8
kernels up to rounding, faster to compile) with the stdlib calibration windows, then
scored on the same ``--n`` stdlib completion samples and ``--ppl-windows`` perplexity
windows as fp32. One JSON per model (``OUT/<label>.json``, written atomically) holds the
per-sample ES / EM: a finished label is not run again (Ctrl-C loses only the one in
progress). ``--report`` prints, per recipe, ES and its paired difference from fp32
with a 95% paired t interval (mean of the per-sample differences +- t(0.975, n-1) *
sd / sqrt(n)), EM, and perplexity with its ratio to fp32 and a 95% interval for the
ratio (exp of the paired t interval of the per-window mean log-loss differences). The t quantile uses the Cornish-Fisher expansion (error < 1e-3 for
n - 1 >= 10), so nothing beyond the standard library is needed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from qdsl.atomic import write_json_atomic

RECIPES = (("baseline", "algorithms/w8a8_static_baseline.qrec"),
           ("smooth", "algorithms/smoothquant_w8a8_static.qrec"),
           ("smooth_norms", "algorithms/smoothquant_norms_w8a8_static.qrec"),
           ("rotate", "algorithms/rotate_w8a8_static.qrec"),
           ("smooth_rotate", "algorithms/smooth_rotate_w8a8_static.qrec"),
           ("rotate_mse", "algorithms/rotate_w8a8_static_mse.qrec"),
           ("rotate_pct", "algorithms/rotate_w8a8_static_pct.qrec"),
           ("rotate_down16", "algorithms/rotate_w8a8_static_down16.qrec"),
           ("wei_w4a8", "wei/t5_w4a8.qrec"),
           ("rotate_gptq_w4a8", "algorithms/rotate_gptq_w4a8.qrec"),
           ("gptq_g64", "algorithms/gptq_w4a16_g64.qrec"))


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (Cornish-Fisher)."""
    z = 1.959963984540054
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def paired(a: list[float], b: list[float]) -> tuple[float, float, float, float]:
    """(mean of a - b, sd of the differences, lo, hi) with a 95% paired t interval."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    m, sd = statistics.fmean(d), statistics.stdev(d)
    h = t975(len(d) - 1) * sd / math.sqrt(len(d))
    return m, sd, m - h, m + h


@torch.inference_mode()
def window_nll(lm, tok, samples, n_windows: int, window: int) -> list[dict]:
    """Per window (the perplexity windows of qdsl.eval.complete.score_perplexity: each
    sample's context + target, its last ``window`` tokens): summed NLL and token count."""
    import torch.nn.functional as F
    out = []
    for s in samples[:n_windows]:
        ids = tok(s.context + s.target + "\n", add_special_tokens=False)["input_ids"][-window:]
        if len(ids) < 2:
            continue
        x = torch.tensor([ids], dtype=torch.long)
        logits = lm.logits(x)[0, :-1].float()
        out.append({"id": s.id, "nll": F.cross_entropy(logits, x[0, 1:], reduction="sum").item(),
                    "tokens": len(ids) - 1})
    return out


def run(args) -> None:
    from qdsl.compiler import compile as qcompile
    from qdsl.config.recipe import Settings
    from qdsl.eval.complete import CompletionConfig, evaluate
    from qdsl.eval.complete import DEFAULT_PROMPT, PROMPT_BY_MODEL
    from qdsl.eval.samples import stdlib_bench
    from qdsl.lang import load_recipe
    from qdsl.models import zoo
    from qdsl.models.lm import HFCausalLM
    from qdsl.resources import data_dir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = zoo.load_model(args.model, require_causal=True)
    samples = stdlib_bench(max(args.n, args.ppl_windows), seed=args.seed)
    cfg = CompletionConfig(args.ctx_tokens, 48, PROMPT_BY_MODEL.get(args.model, DEFAULT_PROMPT))
    common = {"model": args.model, "n": args.n, "seed": args.seed, "lower": args.lower,
              "ppl_windows": args.ppl_windows, "cpu": torch.backends.cpu.get_cpu_capability(),
              "threads": torch.get_num_threads()}
    todo = [r for r in (("fp32", None),) + RECIPES if not args.only or r[0] in args.only]
    for label, recipe in todo:
        path = out / f"{label}.json"
        if path.exists():
            print(f"{label}: done ({path})")
            continue
        t0 = time.time()
        if recipe is None:
            lm, compile_s = HFCausalLM(model, args.model), 0.0
        else:
            r = load_recipe(data_dir("recipes") / recipe)
            q = qcompile(model, r, calib="stdlib", tokenizer=tok, lower=args.lower,
                         max_cache_len=args.ctx_tokens + 64,
                         settings=Settings(calib_samples=args.calib_samples))
            lm, compile_s = q.lm(name=label), time.time() - t0
        res = evaluate(lm, tok, samples[:args.n], cfg, max_positions=args.ctx_tokens + 63,
                       ppl_windows=0, progress=False,
                       batch_size=args.batch_size if recipe is None else 1,
                       ) if args.n else {"es": None, "em": None}
        res["windows"] = window_nll(lm, tok, samples, args.ppl_windows, args.ctx_tokens)
        nll, ntok = (sum(w[k] for w in res["windows"]) for k in ("nll", "tokens"))
        res["ppl"] = math.exp(nll / ntok)
        res.update(common, label=label, recipe=recipe, compile_seconds=round(compile_s, 1),
                   seconds=round(time.time() - t0, 1))
        write_json_atomic(path, res)
        print(f"{label}: ES {res['es']} EM {res['em']} ppl {res['ppl']:.3f} "
              f"({res['seconds']} s)", flush=True)


def report(args) -> None:
    out = Path(args.out)
    rows = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
    base = rows["fp32"]
    es0 = [s["es"] for s in base.get("samples", [])]
    print(f"model {base['model']}, n = {base['n']} stdlib samples (seed {base['seed']}), "
          f"{base['ppl_windows']} perplexity windows; cpu {base['cpu']}, "
          f"{base['threads']} threads\n")
    print("| recipe | ES | ES - fp32 [95% paired t CI] | sd of diff | EM | ppl | "
          "ppl / fp32 [95% CI, per-window paired t] |")
    print("|---|---|---|---|---|---|---|")
    known = ["fp32"] + [r[0] for r in RECIPES]
    for label in known + sorted(set(rows) - set(known)):  # extra rows: other tools' models
        if label not in rows:
            continue
        r = rows[label]
        es = [s["es"] for s in r.get("samples", [])]
        if label == "fp32" or len(es) < 2:
            diff, sd = "-", "-"
        else:
            m, sd_, lo, hi = paired(es, es0)
            diff, sd = f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]", f"{sd_:.1f}"
        if label == "fp32":
            ratio = "-"
        else:  # per-window mean NLL differences, paired t CI, as a perplexity ratio
            a = [w["nll"] / w["tokens"] for w in r["windows"]]
            b = [w["nll"] / w["tokens"] for w in base["windows"]]
            m, _, lo, hi = paired(a, b)
            ratio = f"{r['ppl'] / base['ppl']:.3f} [{math.exp(lo):.3f}, {math.exp(hi):.3f}]"
        es_s = "-" if r["es"] is None else f"{r['es']:.2f}"
        em_s = "-" if r["em"] is None else f"{r['em']:.1f}"
        print(f"| {label} | {es_s} | {diff} | {sd} | {em_s} | {r['ppl']:.3f} | {ratio} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=100, help="completion samples (0: perplexity only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ppl-windows", type=int, default=64)
    p.add_argument("--ctx-tokens", type=int, default=256)
    p.add_argument("--lower", default="fake", choices=("fake", "int8"))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="fp32 completions decoded "
                   "together (compiled graphs: batch 1, as qdsl eval runs artifacts)")
    p.add_argument("--calib-samples", type=int, default=None,
                   help="override the recipes' calib.samples (a busy machine)")
    p.add_argument("--only", nargs="*", help="labels to run: fp32 and recipe labels "
                   "(default: all; several processes may share one --out)")
    p.add_argument("--out", required=True)
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    report(args) if args.report else run(args)


if __name__ == "__main__":
    main()
