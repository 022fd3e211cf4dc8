"""Batched against one-at-a-time greedy completion (``qdsl eval --batch-size``), side
by side in one process on the same samples: samples/s of each, and whether the
completions are identical.

    .venv/bin/python tools/bench_batched_eval.py smollm2-135m ART_FAKE ART_INT8 \\
        --n 64 --chunk 16 --batch-size 8 --json /tmp/batched.json

Each model (a name or an artifact directory) is loaded twice: at batch 1 (today's
loop: ``score_completion`` one sample per ``greedy``) and at ``--batch-size``
(``greedy_batch``; an artifact's graph is captured with that many rows). The
samples are cut in chunks of ``--chunk``; per chunk both run, the order
alternating (old, new / new, old, ...), so load changes on the shared machine
hit both alike. Reported: samples/s of each over all chunks and the ratio, the
number of samples whose completion differs and, for each, why: the first token
where the two greedy runs part, the top-2 logit margin there in the batch-1 run,
and the largest difference between the two runs' prefill logits (float
summation order).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from qdsl.eval.complete import (DEFAULT_PROMPT, PROMPT_BY_MODEL, CompletionConfig, _batches,
                                _stop_rule, prompt_ids, score_completion)
from qdsl.eval.run import is_artifact, load_lm
from qdsl.eval.samples import load_bench


def _first_split(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.inference_mode()
def why_differs(one, many, tok, chunk, index: int, cfg, max_pos, rows: int) -> dict:
    """Where the batch-1 and batched greedy runs of ``chunk[index]`` part (the batched
    run replayed with the batch score_completion gave it), and by how much."""
    key = lambda s: len(prompt_ids(tok, s, cfg, max_pos)[0])   # noqa: E731 (as score_completion)
    batch = next(b for b in _batches(chunk, rows, key) if index in b)
    prompts = [prompt_ids(tok, chunk[i], cfg, max_pos)[0].tolist() for i in batch]
    stop = _stop_rule(tok, cfg)
    ids = torch.tensor([prompts[batch.index(index)]])
    a = one.greedy(ids, cfg.max_new_tokens, stop)
    b = many.greedy_batch(prompts, cfg.max_new_tokens, stop)[batch.index(index)]
    at = _first_split(a, b)
    logits = one.prefill(ids)
    for t in a[:at]:                       # replay batch 1 up to the split
        logits = one.decode(t)
    top2 = logits.topk(2).values
    return {"id": chunk[index].id, "split_at_token": at, "batch_rows": len(batch),
            "pad_tokens": max(map(len, prompts)) - len(prompts[batch.index(index)]),
            "top2_margin_batch1": float(top2[0] - top2[1])}


def prefill_noise(one, many, tok, samples, cfg, max_pos, rows: int) -> float:
    """Largest |logit| difference, last prompt position, batch 1 vs a left-padded batch."""
    prompts = [prompt_ids(tok, s, cfg, max_pos)[0].tolist() for s in samples[:rows]]
    batched = many.logits_rows(prompts)
    return max(float((one.prefill(torch.tensor([p])) - b[-1]).abs().max())
               for p, b in zip(prompts, batched))


def bench_model(name: str, samples, args) -> dict:
    one, tok, max_pos, short = load_lm(name, batch_size=1)
    # a float model batches any number of rows: the same object; a graph: captured again
    many = load_lm(name, batch_size=args.batch_size)[0] if is_artifact(name) else one
    rows = getattr(many, "batch_size", None) or args.batch_size
    cfg = CompletionConfig(args.ctx_tokens, args.max_new_tokens,
                           PROMPT_BY_MODEL.get(short, DEFAULT_PROMPT))
    t = {"old": 0.0, "new": 0.0}
    preds = {"old": [], "new": []}
    for k, i in enumerate(range(0, len(samples), args.chunk)):
        chunk = samples[i:i + args.chunk]
        order = ("old", "new") if k % 2 == 0 else ("new", "old")
        for which in order:
            lm, bs = (one, 1) if which == "old" else (many, args.batch_size)
            t0 = time.perf_counter()
            res = score_completion(lm, tok, chunk, cfg, max_pos, progress=False, batch_size=bs)
            t[which] += time.perf_counter() - t0
            preds[which].append(res["samples"])
        print(f"  {name}: chunk {k}: old {t['old']:.1f}s new {t['new']:.1f}s", flush=True)
    old = [r for c in preds["old"] for r in c]
    new = [r for c in preds["new"] for r in c]
    differ = [i for i, (a, b) in enumerate(zip(old, new)) if a["pred"] != b["pred"]]
    out = {"model": name, "batch_size": rows, "n": len(samples),
           "old_samples_per_s": len(samples) / t["old"], "new_samples_per_s": len(samples) / t["new"],
           "speedup": t["old"] / t["new"], "old_seconds": t["old"], "new_seconds": t["new"],
           "differ": len(differ),
           "em_old": sum(r["em"] for r in old), "em_new": sum(r["em"] for r in new),
           "prefill_max_abs_diff": prefill_noise(one, many, tok, samples, cfg, max_pos, rows),
           "differences": [why_differs(one, many, tok, samples[i - i % args.chunk:][:args.chunk],
                                       i % args.chunk, cfg, max_pos, rows) for i in differ[:10]]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="model names or artifact directories")
    ap.add_argument("--bench", default="stdlib")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--ctx-tokens", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    samples = load_bench(args.bench, args.n, args.seed)
    env = {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(env, flush=True)
    results = []
    for name in args.models:
        r = bench_model(name, samples, args)
        r["artifact"] = is_artifact(name)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "differences"}), flush=True)
        for d in r["differences"]:
            print("   differs:", json.dumps(d), flush=True)
    if args.json:
        from qdsl.atomic import write_json_atomic
        write_json_atomic(args.json, {"env": env, "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
