"""Figures for docs/algorithms-weights.md: round-to-nearest vs GPTQ vs AWQ weights.

    .venv/bin/python tools/bench_rounding.py --model stdlib-gpt2 --n 200 \\
        --out results/rounding-stdlib-gpt2.json \\
        recipes/algorithms/rtn_w4a16_g128.qrec recipes/algorithms/gptq_w4a16_g128.qrec \\
        recipes/algorithms/awq_w4a16_g128.qrec

Each recipe is compiled (``--lower fake``, calibration on the stdlib's non-test
sources) in its own subprocess, which reports its wall time and peak RSS
(``ru_maxrss``: model load + calibration + rounding); the parent then scores the
float model and every artifact on the same held-out completions (EM, ES) and
perplexity windows. ES differences are paired per sample against the first recipe and
against fp32, with a 95% Student t interval (t quantile from the Cornish-Fisher
expansion, |error| < 1e-3 for n >= 10). Results go to ``--out`` (JSON, written
atomically) and a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, logging
import torch
torch.set_num_threads(int(sys.argv[4]))
import qdsl
from qdsl.models.zoo import load_model
t0 = time.perf_counter()
m, tok = load_model(sys.argv[1])
t1 = time.perf_counter()
from qdsl.config.recipe import Settings
samples = int(sys.argv[5]) or None
q = qdsl.compile(m, qdsl.load_recipe(sys.argv[2]), calib="stdlib", tokenizer=tok,
                 lower="fake", progress=False, settings=Settings(calib_samples=samples))
t2 = time.perf_counter()
q.save(sys.argv[3], force=True)
print(json.dumps({"load_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def t975(df: int) -> float:
    """Student t 0.975 quantile, Cornish-Fisher expansion around z = 1.959964."""
    z = 1.959964
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of a - b with its 95% t interval."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else float("nan")
    half = t975(n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": round(mean, 3), "lo": round(mean - half, 3), "hi": round(mean + half, 3), "n": n}


def compile_child(model: str, recipe: str, out: Path, threads: int, samples: int) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, model, recipe, str(out), str(threads),
                        str(samples)],
                       capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if r.returncode:
        raise SystemExit(f"compiling {recipe} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--model", default="stdlib-gpt2")
    ap.add_argument("--n", type=int, default=200, help="completion samples")
    ap.add_argument("--ppl-windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=0,
                    help="calibration windows, overriding the recipes' (0: the recipe's)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    from qdsl.atomic.files import write_json_atomic
    from qdsl.eval.complete import CompletionConfig, evaluate, PROMPT_BY_MODEL, DEFAULT_PROMPT
    from qdsl.eval.run import fit_eval, load_lm
    from qdsl.eval.samples import stdlib_bench

    samples = stdlib_bench(a.n, seed=0)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="qdsl-rounding-") as tmp:
        for rec in a.recipes:
            name = Path(rec).stem
            print(f"compiling {name} ...", file=sys.stderr, flush=True)
            rows[name] = {"recipe": rec, **compile_child(a.model, rec, Path(tmp) / name, a.threads,
                                                          a.samples)}
        targets = [("fp32", a.model)] + [(n, str(Path(tmp) / n)) for n in rows]
        # one context for all: what the tightest (an artifact's static cache) holds
        ctx, positions = min(fit_eval(t, a.model) for _, t in targets[1:]) if rows \
            else fit_eval(a.model)
        for name, target in targets:
            print(f"scoring {name} ...", file=sys.stderr, flush=True)
            lm, tok, _, short = load_lm(target, source=a.model)
            cfg = CompletionConfig(ctx_tokens=ctx,
                                   prompt=PROMPT_BY_MODEL.get(a.model, DEFAULT_PROMPT))
            t0 = time.perf_counter()
            r = evaluate(lm, tok, samples, cfg, max_positions=positions,
                         ppl_windows=a.ppl_windows, progress=False)
            rows.setdefault(name, {}).update(
                {k: r[k] for k in ("n", "em", "es", "ppl", "bpb")},
                eval_s=round(time.perf_counter() - t0, 1),
                es_samples=[s["es"] for s in r["samples"]])
            del lm
    names = list(rows)
    first = a.recipes and Path(a.recipes[0]).stem
    for n in names:
        if n != "fp32":
            rows[n]["es_vs_fp32"] = paired(rows[n]["es_samples"], rows["fp32"]["es_samples"])
            if n != first:
                rows[n][f"es_vs_{first}"] = paired(rows[n]["es_samples"], rows[first]["es_samples"])
    meta = {"model": a.model, "n": a.n, "ppl_windows": a.ppl_windows, "threads": a.threads,
            "calib_samples": a.samples or "recipe",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_average": os.getloadavg(), "torch": torch.__version__}
    write_json_atomic(a.out, {"meta": meta, "rows": rows})
    print(f"| recipe | ppl | ES | EM | ES vs fp32 (95% CI) | ES vs {first} (95% CI) | compile s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for n, r in rows.items():
        ci = lambda k: (f"{r[k]['mean']:+.2f} [{r[k]['lo']:+.2f}, {r[k]['hi']:+.2f}]"  # noqa: E731
                        if k in r else "-")
        print(f"| {n} | {r['ppl']:.2f} | {r['es']:.2f} | {r['em']:.1f} | {ci('es_vs_fp32')} | "
              f"{ci(f'es_vs_{first}')} | {r.get('compile_s', '-')} | {r.get('peak_rss_mb', '-')} |")
    print(f"\n{meta}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
