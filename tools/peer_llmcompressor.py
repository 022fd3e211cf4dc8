"""Peer comparison: llm-compressor's GPTQ on the same model and calibration windows as qdsl.

llm-compressor (``llmcompressor``, vLLM's quantization toolkit) must not go into the
project's venv (it pins transformers <= 5.17 and compressed-tensors 0.19); it lives in
its own venv, which sees the project's torch through a ``.pth`` line so torch is never
reinstalled:

    python3.11 -m venv /work/venv-llmc
    echo /work/main/.venv/lib/python3.11/site-packages \\
        > /work/venv-llmc/lib/python3.11/site-packages/zz_project_torch.pth
    /work/venv-llmc/bin/pip install llmcompressor==0.14.0.1

Three steps, each its own process:

    # 1. (project venv) the model as an HF directory + qdsl's calibration windows
    .venv/bin/python tools/peer_llmcompressor.py prepare --model smollm2-135m --out DIR
    # 2. (llm-compressor venv) GPTQ W4A16, saved dense (decompressed) for qdsl eval
    /work/venv-llmc/bin/python tools/peer_llmcompressor.py gptq --out DIR --group 64
    # 3. (project venv) qdsl eval DIR/llmc-gptq --baseline DIR/hf ...
    # or, SmoothQuant alone (float output, quantized by qdsl's own recipe afterwards):
    /work/venv-llmc/bin/python tools/peer_llmcompressor.py smooth --out DIR --alpha 0.5
    .venv/bin/python tools/bench_algorithms.py --model DIR/llmc-smooth --only baseline ...

``prepare`` writes ``DIR/hf`` (config, safetensors weights, tokenizer) and
``DIR/calib.safetensors`` (the ``[N, T]`` token windows qdsl calibrates on:
``calib="stdlib"``, seed 0). ``gptq`` runs ``oneshot`` with one ``GPTQModifier``
(symmetric int4 weights, one scale per group of ``--group`` input columns, every
Linear but lm_head, block size 128, dampening 0.01, act-order off: llm-compressor's
W4A16 defaults) on those windows, reports wall time and peak RSS, and saves the
quantized model **decompressed** (``save_compressed=False``: dequantized float weights
in a plain HF directory) so that ``qdsl eval`` reads it as a checkpoint directory.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def prepare(args) -> None:
    import torch
    from safetensors.torch import save_file

    from qdsl.models.calib import CalibSpec, calibration_windows
    from qdsl.models import zoo

    out = Path(args.out)
    model, tok = zoo.load_model(args.model, require_causal=True)
    model.save_pretrained(out / "hf", safe_serialization=True)
    tok.save_pretrained(out / "hf")
    w = calibration_windows(CalibSpec("stdlib", samples=args.samples, seq_len=args.seq_len,
                                      seed=0), tok)
    save_file({"input_ids": w.to(torch.long).contiguous()}, str(out / "calib.safetensors"))
    print(f"{out / 'hf'}; calibration windows {list(w.shape)}")


def _oneshot(args, modifier, name: str, *, compressed: bool | None = None,
             track_changes: bool = False) -> dict:
    """Run llm-compressor's ``oneshot`` with one modifier on the first ``--windows`` of
    DIR/calib.safetensors and save the model to DIR/NAME (``compressed``: passed on as
    ``save_compressed``); return what was measured (wall time, peak RSS; with
    ``track_changes`` the tensors it changed, at the cost of a copy of the weights)."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    ids = load_file(str(out / "calib.safetensors"))["input_ids"][:args.windows or None]
    ds = Dataset.from_dict({"input_ids": ids.tolist(),
                            "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out / "hf")
    before = {k: v.clone() for k, v in model.state_dict().items()} if track_changes else {}
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=[modifier], max_seq_length=ids.shape[1],
            num_calibration_samples=ids.shape[0])
    wall = time.perf_counter() - t0
    model.save_pretrained(out / name, **({} if compressed is None
                                         else {"save_compressed": compressed}))
    tok.save_pretrained(out / name)
    info = {"tool": "llmcompressor", "modifier": type(modifier).__name__,
            "calib_windows": list(ids.shape), "threads": torch.get_num_threads(),
            "cpu": torch.backends.cpu.get_cpu_capability(), "wall_s": round(wall, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if track_changes:
        changed = sorted(k for k, v in model.state_dict().items()
                         if k not in before or not torch.equal(v, before[k]))
        info.update(changed_tensors=len(changed), changed_examples=changed[:6])
    return info


def _report(args, name: str, info: dict) -> None:
    (Path(args.out) / f"{name}.json").write_text(json.dumps(info, indent=1, default=str))
    print(json.dumps(info, default=str))


def gptq(args) -> None:
    from llmcompressor.modifiers.quantization import GPTQModifier

    scheme = {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
        "group_size": args.group, "observer": "minmax"}}}
    mod = GPTQModifier(config_groups=scheme, ignore=["lm_head"], block_size=128,
                       dampening_frac=0.01, actorder=None)
    info = _oneshot(args, mod, "llmc-gptq", compressed=False)
    _report(args, "llmc-gptq", {**info, "group": args.group})


def smooth(args) -> None:
    """llm-compressor's SmoothQuantModifier alone (no quantization), saved as a float
    checkpoint: qdsl then quantizes it with the same recipe as its own smoothed model."""
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    mod = SmoothQuantModifier(smoothing_strength=args.alpha)
    info = _oneshot(args, mod, "llmc-smooth", track_changes=True)
    mappings = ([[list(m.balance_layers), m.smooth_layers] for m in mod.mappings]
                if mod.mappings else "default")       # resolved by oneshot for the model
    _report(args, "llmc-smooth", {**info, "alpha": args.alpha, "mappings": mappings})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", choices=("prepare", "gptq", "smooth"))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", required=True)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--alpha", type=float, default=0.5, help="smooth: smoothing strength")
    p.add_argument("--windows", type=int, default=0,
                   help="gptq / smooth: calibrate on the first N windows only (0: all)")
    args = p.parse_args()
    {"prepare": prepare, "gptq": gptq, "smooth": smooth}[args.step](args)


if __name__ == "__main__":
    main()
