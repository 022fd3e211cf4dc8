"""What a fake-quant artifact's evaluation costs against the float model's (issue 15's
"fast fake-quant simulation": at most 1.5x), and what session 38's changes do to it:
float attention fused in the fake pipeline (``fuse_attention``: only the filled part of
the static cache), the head on the last prompt position only in a greedy prefill
(``graphlm.last_position_graph``) and qdsl's one-pass fake-quant kernels
(``kernels.fake_quant`` / ``dynamic_fake_quant``).

Four rows, run in alternation in one process on the same inputs (paired rounds):
``float`` (the source model as ``qdsl eval`` runs it); ``before`` (the artifact loaded
without ``fuse_attention``, the head on every position, the kernels off: what ran
before these changes); ``fused-torch-fq`` (everything but the kernels) and ``after``
(as it runs now). Two
workloads of fixed size, so a broken model's long completions do not count as
simulation cost: ``logits`` (the perplexity forward, B rows x T tokens) and ``greedy``
(B prompts of P tokens, N new tokens each, no stop rule). Ratios are paired over rounds
(geometric mean, 95% t interval on the log ratios). ``after`` and ``fused-torch-fq``
tokens must agree exactly (the kernels are bit-identical); ``before`` may differ in a
few tokens (SDPA sums in another order), counted.

  python tools/bench_fake_eval.py ARTIFACT --source smollm2-135m --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from qdsl.eval.run import load_lm
from qdsl.passes import pipeline
from qdsl.runtime import kernels
from qdsl.study.stats import time_ratio

ROWS = ("float", "before", "fused-torch-fq", "after")
RATIOS = (("before", "float"), ("after", "float"), ("after", "before"),
          ("fused-torch-fq", "before"), ("after", "fused-torch-fq"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", help="a --lower fake artifact directory")
    ap.add_argument("--source", required=True, help="its source model (short name or directory)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8, help="rows per forward (B)")
    ap.add_argument("--tokens", type=int, default=256, help="logits workload: tokens a row (T)")
    ap.add_argument("--prompt", type=int, default=200, help="greedy workload: prompt tokens (P)")
    ap.add_argument("--new", type=int, default=32, help="greedy workload: new tokens (N)")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    flt, tok = load_lm(a.source, batch_size=a.batch)[:2]
    vocab = min(30000, len(tok))               # random ids the tokenizer knows
    ids = torch.randint(min(100, vocab // 2), vocab, (a.batch, a.tokens),
                        generator=torch.Generator().manual_seed(0))
    prompts = ids[:, :a.prompt].tolist()
    fake = load_lm(a.artifact, batch_size=a.batch, source=a.source)[0]
    fused = pipeline.LOWERINGS["fake"]
    pipeline.LOWERINGS["fake"] = [p for p in fused if p is not pipeline.FUSE_ATTENTION]
    try:
        unfused = load_lm(a.artifact, batch_size=a.batch, source=a.source)[0]
    finally:
        pipeline.LOWERINGS["fake"] = fused
    unfused._last = [None]                     # the head on every position, as before
    models = {"float": flt, "before": unfused, "fused-torch-fq": fake, "after": fake}
    on = (kernels.fake_quant, kernels.dynamic_fake_quant)

    def use_kernels(yes: bool) -> None:
        kernels.fake_quant, kernels.dynamic_fake_quant = on if yes else (lambda *_: None,) * 2

    for lm in (flt, fake, unfused):
        lm.logits(ids[:, :16])                     # warm: allocations, the kernels' build
    times = {r: {"logits": [], "greedy": []} for r in ROWS}
    tokens = {}
    for rnd in range(a.rounds):
        for row in ROWS:
            use_kernels(row == "after")
            lm = models[row]
            t = time.perf_counter()
            lm.logits(ids)
            times[row]["logits"].append(time.perf_counter() - t)
            t = time.perf_counter()
            tokens[row] = lm.greedy_batch(prompts, a.new)
            times[row]["greedy"].append(time.perf_counter() - t)
            print(f"round {rnd}: {row:10s} logits {times[row]['logits'][-1]:6.2f} s  "
                  f"greedy {times[row]['greedy'][-1]:6.2f} s", file=sys.stderr, flush=True)
    use_kernels(True)
    out = {"artifact": a.artifact, "source": a.source, "threads": a.threads,
           "capability": torch.backends.cpu.get_cpu_capability(),
           "workloads": {"logits": f"{a.batch} x {a.tokens} tokens",
                         "greedy": f"{a.batch} x ({a.prompt} + {a.new}) tokens"},
           "rounds": a.rounds, "seconds": times,
           "fake_tokens_identical": tokens["fused-torch-fq"] == tokens["after"],
           "tokens_differing_from_before": sum(
               x != y for r, s in zip(tokens["before"], tokens["after"]) for x, y in zip(r, s)),
           "tokens": sum(len(r) for r in tokens["after"]), "ratios": {}}
    for work in ("logits", "greedy"):
        for num, den in RATIOS:
            iv = time_ratio(times[num][work], times[den][work])
            out["ratios"][f"{work}: {num} / {den}"] = [iv.est, iv.lo, iv.hi]
    for key, (est, lo, hi) in out["ratios"].items():
        print(f"{key:34s} {est:.3f} [{lo:.3f}, {hi:.3f}]")
    print(f"after and fused-torch-fq tokens identical: {out['fake_tokens_identical']}; "
          f"{out['tokens_differing_from_before']} of {out['tokens']} tokens differ from "
          f"before; capability {out['capability']}, {a.threads} thread(s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if out["fake_tokens_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
