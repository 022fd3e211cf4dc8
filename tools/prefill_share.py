"""How much of a completion sample the prefill costs, at batch 1 and batched: the
ceiling on what batching can gain (``qdsl eval --batch-size``; issue 16's 2x target).

    .venv/bin/python tools/prefill_share.py smollm2-135m --n 16 --batch-size 8 --passes 2

On the same stdlib samples (seed 0, the ``--n`` after the first ``--skip``), per pass:
the prompts' prefill alone (``prefill`` one at a time; ``_prefill_rows`` in batches of
``--batch-size``, left-padded, in ``qdsl eval``'s order) and then whole greedy
completions the same way; printed as seconds per sample and the prefill's share. With
the prefill per sample fixed, batching removes at most the decode share: the best
possible speedup is 1 / (batch-1 prefill share). MODEL: a model name or an artifact.
"""

from __future__ import annotations

import argparse
import time

import torch

from qdsl.eval.complete import (DEFAULT_PROMPT, PROMPT_BY_MODEL, CompletionConfig, _batches,
                                complete_line, complete_lines, prompt_ids)
from qdsl.eval.run import load_lm
from qdsl.eval.samples import load_bench
from qdsl.models.batching import left_pad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--skip", type=int, default=0, help="samples skipped first (warm-up set)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    one, tok, max_pos, short = load_lm(a.model)
    many = load_lm(a.model, batch_size=a.batch_size)[0]
    cfg = CompletionConfig(256, 48, PROMPT_BY_MODEL.get(short, DEFAULT_PROMPT))
    samples = load_bench("stdlib", a.skip + a.n, 0)[a.skip:]
    prompts = [prompt_ids(tok, s, cfg, max_pos)[0] for s in samples]
    rows = getattr(many, "batch_size", None) or a.batch_size
    order = _batches(samples, rows, lambda s: len(prompt_ids(tok, s, cfg, max_pos)[0]))
    print(f"{a.model}: {a.n} samples, {sum(map(len, prompts)) / a.n:.1f} prompt tokens on "
          f"average, batch {rows}, {a.threads} thread(s), "
          f"{torch.backends.cpu.get_cpu_capability()}")

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) / a.n

    for k in range(a.passes):
        p1 = timed(lambda: [one.prefill(p[None]) for p in prompts])
        c1 = timed(lambda: [complete_line(one, tok, s, cfg, max_pos) for s in samples])
        pb = timed(lambda: [many._prefill_rows(*left_pad([prompts[i].tolist() for i in idx],
                                                         rows)) for idx in order])
        cb = timed(lambda: [complete_lines(many, tok, [samples[i] for i in idx], cfg, max_pos)
                            for idx in order])
        print(f"pass {k + 1}: batch 1 prefill {p1:.3f} of {c1:.3f} s/sample ({p1 / c1:.0%}); "
              f"batch {rows} prefill {pb:.3f} of {cb:.3f} ({pb / cb:.0%}); speedup "
              f"{c1 / cb:.2f}x, ceiling with free decoding {c1 / pb:.2f}x", flush=True)


if __name__ == "__main__":
    main()
