"""Where does a static-activation recipe lose its perplexity? Leave-one-group-out ablation.

    python tools/ablate_inputs.py --model smollm2-135m \\
        --recipe algorithms/rotate_w8a8_static.qrec --windows 16 --calib-samples 16

Compiles the recipe once (``--lower fake``), then scores the same perplexity windows as
tools/bench_algorithms.py (stdlib, seed 0) with every activation quantizer on, with each
*group* of quantizers switched off (a group: the quantizers whose node name is the same
after ``block.N.``, e.g. ``mlp.mul`` = the down-projection's input in every block), and
with each group alone on. A quantizer is switched off by making its forward the
identity on this in-memory graph (nothing is saved). Per row: perplexity, ratio to fp32
(pooled), and the paired 95% t interval of the ratio (per-window mean log-loss, as
bench_algorithms). With ``--per-block GROUP`` also each block of that group alone off.
Diagnosis only: the numbers say which quantizers carry the loss, not what fixes it.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_algorithms import paired, window_nll  # noqa: E402  (tools/ is no package)


def group_of(name: str) -> str:
    """``qdsl_act__block_3_mlp_mul`` -> ``mlp_mul`` (the activation quantizer modules)."""
    return re.sub(r"^qdsl_act__block_\d+_", "", name)


@torch.no_grad()
def rotate_heads_hf(model) -> None:
    """v_proj rows of each KV head -> H^T W_h (bias H^T b_h), o_proj columns -> W (I x H)."""
    from qdsl.quant.hadamard import hadamard
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    h = hadamard(hd)
    for layer in model.model.layers:
        v, o = layer.self_attn.v_proj, layer.self_attn.o_proj
        w = v.weight.double().reshape(-1, hd, v.weight.shape[1])
        v.weight.copy_(torch.einsum("ij,kil->kjl", h, w).reshape(v.weight.shape))
        if v.bias is not None:
            v.bias.copy_((v.bias.double().reshape(-1, hd) @ h).reshape(-1))
        wo = o.weight.double().reshape(o.weight.shape[0], -1, hd)
        o.weight.copy_((wo @ h).reshape(o.weight.shape))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", required=True, help="under recipes/ (or a path)")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--ctx-tokens", type=int, default=256)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--per-block", nargs="*", default=[])
    p.add_argument("--alone", action="store_true", help="also each group alone on")
    p.add_argument("--groups", nargs="*", help="only these groups (default: all)")
    p.add_argument("--top-off", nargs=2, metavar=("GROUP", "K"), help="rows with the k = 1..K "
                   "quantizers of GROUP with the widest calibrated ranges off")
    p.add_argument("--heads", action="store_true", help="experiment: rotate each attention "
                   "head's V output and o_proj's input columns by H_head_dim on the float "
                   "model first (QuaRot's offline V/O rotation; function-preserving)")
    args = p.parse_args()

    from qdsl.compiler import compile as qcompile
    from qdsl.config.recipe import Settings
    from qdsl.eval.samples import stdlib_bench
    from qdsl.lang import load_recipe
    from qdsl.models import zoo
    from qdsl.models.lm import HFCausalLM
    from qdsl.resources import data_dir
    from qdsl.runtime.fakequant import FakeQuant

    torch.set_num_threads(args.threads)
    print(f"cpu {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads",
          flush=True)
    model, tok = zoo.load_model(args.model, require_causal=True)
    samples = stdlib_bench(args.windows, seed=0)
    t0 = time.time()
    base = window_nll(HFCausalLM(model, args.model), tok, samples, args.windows, args.ctx_tokens)
    print(f"fp32 {len(base)} windows ({time.time() - t0:.0f} s)", flush=True)
    if args.heads:
        rotate_heads_hf(model)
    path = Path(args.recipe)
    r = load_recipe(path if path.exists() else data_dir("recipes") / args.recipe)
    t0 = time.time()
    q = qcompile(model, r, calib="stdlib", tokenizer=tok, lower="fake",
                 max_cache_len=args.ctx_tokens + 64, progress=False,
                 settings=Settings(calib_samples=args.calib_samples))
    print(f"compiled {args.recipe} ({time.time() - t0:.0f} s)", flush=True)
    lm = q.lm()
    fqs = {n: m for n, m in q.gm.named_modules() if isinstance(m, FakeQuant)}
    groups = defaultdict(list)
    for n in fqs:
        groups[group_of(n)].append(n)
    print("quantizers:", {g: len(v) for g, v in groups.items()}, flush=True)

    def score(label: str, off: set[str]) -> None:
        for n, m in fqs.items():
            if n in off:
                m.forward = lambda x: x
            elif "forward" in m.__dict__:
                del m.forward
        t = time.time()
        w = window_nll(lm, tok, samples, args.windows, args.ctx_tokens)
        a = [x["nll"] / x["tokens"] for x in w]
        b = [x["nll"] / x["tokens"] for x in base]
        m_, _, lo, hi = paired(a, b)
        ppl = math.exp(sum(x["nll"] for x in w) / sum(x["tokens"] for x in w))
        ppl0 = math.exp(sum(x["nll"] for x in base) / sum(x["tokens"] for x in base))
        print(f"| {label} | {ppl:.3f} | {ppl / ppl0:.3f} [{math.exp(lo):.3f}, "
              f"{math.exp(hi):.3f}] | {time.time() - t:.0f} s |", flush=True)

    rng = {n: float(m.scale.max()) * (2 ** (m.bits - 1) - 1) for n, m in fqs.items()}
    for g, names in groups.items():
        print(f"range {g}: " + ", ".join(f"{n.removeprefix('qdsl_act__')} {rng[n]:.3g}"
                                          for n in names), flush=True)
    print("| quantizers off | ppl | ppl / fp32 [95% CI] | time |\n|---|---|---|---|")
    score("none (all on)", set())
    if args.top_off:
        g, k = args.top_off[0], int(args.top_off[1])
        wide = sorted(groups[g], key=lambda n: -rng[n])
        for i in range(1, k + 1):
            score(f"{', '.join(n.removeprefix('qdsl_act__') for n in wide[:i])} off",
                  set(wide[:i]))
    if args.groups is not None:
        groups = {g: v for g, v in groups.items() if g in args.groups}
    for g, names in groups.items():
        score(f"{g} off", set(names))
    if args.alone:
        for g, names in groups.items():
            score(f"only {g} on", set(fqs) - set(names))
    for g in args.per_block:
        for n in groups[g]:
            score(f"{n} off", {n})


if __name__ == "__main__":
    main()
