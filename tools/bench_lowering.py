"""Measure `qdsl compile --lower int8`: compile time, artifact size against fp32 / fp16
safetensors, peak RSS while loading the artifact, and agreement of the lowered
model with the fake-quant model built from the same frozen parameters.

    .venv/bin/python tools/bench_lowering.py smollm2-135m recipes/int8/w8a8_dynamic.qrec \\
        --out runs/lowering/smollm2_w8a8 --json runs/lowering/smollm2_w8a8.json

Speed is measured separately by `qdsl bench ARTIFACT` (fp32, fp32 graph, torch.ao,
the artifact, interleaved in fresh processes); this script prints that command.

Agreement: ``--windows`` held-out windows of ``--seq-len`` tokens (Python stdlib
source with the model's tokenizer, else random ids with a fixed seed), whole-window
logits (prefill path, M = T) and the last ``--decode`` positions teacher-forced one
token at a time (decode path, M = 1): top-1 agreement and logit differences.
The noise floor is the fake model against itself with its embedding scaled by
(1 + 1e-6): models whose 8-bit activation grids amplify float rounding (SmolLM2
with per-token a8) cannot agree better than that with any other float kernel.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def windows(tok, vocab: int, n: int, seq_len: int) -> torch.Tensor:
    if tok is not None:
        from qdsl.models.calib import CalibSpec, calibration_windows

        return calibration_windows(CalibSpec("stdlib", samples=n, seq_len=seq_len, seed=1234), tok)
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (n, seq_len), generator=g)


@torch.inference_mode()
def decode_logits(lm, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Teacher-forced: prefill ids[:-k], then decode the last k tokens one at a time."""
    out = [lm.prefill(ids[None, :-k])]
    for t in ids[-k:-1].tolist():
        out.append(lm.decode(t))
    return torch.stack(out)                                  # [k, V]


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a - b).abs()
    return {"top1": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
            "max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "max_rel": float(d.max() / b.abs().max())}


def peak_load(artifact: Path) -> dict:
    """Load the artifact in a fresh process: RSS before, after, and peak (VmHWM)."""
    code = ("import json,time,torch; from qdsl.eval.hosting import _rss_mb,_maxrss_mb; b=_rss_mb(); "
            "t=time.perf_counter(); import qdsl.compiler as C; q=C.load(%r); "
            "print(json.dumps({'rss_base_mb': b, 'rss_after_mb': _rss_mb(), "
            "'peak_mb': _maxrss_mb(), 'load_s': time.perf_counter()-t}))" % str(artifact))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("recipe")
    ap.add_argument("--out", required=True, help="artifact directory to write")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fallback", default="error")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import qdsl.compiler as C
    from qdsl.artifact.store import artifact_size
    from qdsl.eval.hosting import RANDOM_GPT2, load_float
    from qdsl.graph.capture import capture
    from qdsl.runtime.graphlm import GraphLM
    from qdsl.passes.lower_fake import lower_fake

    model = load_float(args.model)
    params = sum(p.numel() for p in model.parameters())
    source = model if args.model == RANDOM_GPT2 else args.model
    t0 = time.perf_counter()
    q8 = C.compile(source, args.recipe, lower="int8", fallback=args.fallback, progress=False)
    compile_s = time.perf_counter() - t0
    out = q8.save(args.out, force=True)
    # the fake-quant model from the same frozen parameters
    captured = capture(model, mode="generate", max_cache_len=q8.max_cache_len)
    fake = GraphLM(lower_fake(captured.gm, q8.named, q8.plan, q8.frozen), q8.max_cache_len)
    lowered = q8.lm()
    ids = windows(q8.tokenizer, model.config.vocab_size, args.windows, args.seq_len)
    pre_a, pre_b, dec_a, dec_b = [], [], [], []
    for row in ids:
        pre_a.append(lowered.logits(row[None])[0])
        pre_b.append(fake.logits(row[None])[0])
        dec_a.append(decode_logits(lowered, row, args.decode))
        dec_b.append(decode_logits(fake, row, args.decode))
    noise = None
    if hasattr(fake.gm, "qdsl_weight__embed"):            # the fake model's own sensitivity:
        with torch.no_grad():                              # embedding x (1 + 1e-6)
            fake.gm.qdsl_weight__embed.mul_(1 + 1e-6)
        noise = agreement(torch.cat([fake.logits(r[None])[0] for r in ids]), torch.cat(pre_b))
    loaded = C.load(out)
    equal = torch.equal(loaded.lm().logits(ids[:2]), lowered.logits(ids[:2]))
    size = artifact_size(out)
    result = {
        "model": args.model, "recipe": args.recipe, "params": params, "compile_s": compile_s,
        "artifact_mb": size / 1e6, "fp32_mb": 4 * params / 1e6, "fp16_mb": 2 * params / 1e6,
        "size_vs_fp32": size / (4 * params), "fallbacks": q8.fallbacks,
        "agreement_prefill": agreement(torch.cat(pre_a), torch.cat(pre_b)),
        "agreement_decode": agreement(torch.cat(dec_a), torch.cat(dec_b)),
        "noise_floor_fake_vs_perturbed_fake": noise,
        "windows": [args.windows, args.seq_len, args.decode],
        "load": peak_load(out), "round_trip_bit_identical": equal,
        "bench_command": f"{sys.executable} -m qdsl.cli bench {out}"
                         + (f" --baseline {args.model}" if args.model == RANDOM_GPT2 else ""),
    }
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
