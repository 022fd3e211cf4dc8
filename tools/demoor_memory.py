"""Resident memory a model adds when it is loaded (de Moor Table 2's memory column,
measured as an RSS delta rather than the whole process).

Each model is loaded in a fresh process that first imports everything any of them
needs (torch, transformers, qdsl's loader and graph runtime) and builds / loads the
C++ kernels, so imports and shared libraries are in the baseline; then

    rss0 = RSS after gc + malloc_trim          (before loading)
    load the model (and run one decode step, so lazily built state exists)
    rss1 = RSS after gc + malloc_trim

and reports ``rss1 - rss0`` (and the part an artifact's tokenizer holds: RSS freed by
dropping it; the float rows load no tokenizer) together with the bytes of the tensors
the model holds (parameters, buffers and graph constants, each storage once), split
into weights and the KV cache (the graph's in-place-updated state; the eager model's
cache is dynamic).

    python tools/demoor_memory.py [--cache-len 256] fp32=stdlib-gpt2 graph=stdlib-gpt2 \
        1w8a=runs/demoor/1w8a ...

(``graph=NAME``: the float model run as qdsl runs an artifact: captured, static cache.)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _settle() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return _rss()


def _tensor_bytes(module, state_names: set[str]) -> tuple[int, int]:
    """(weight bytes, state bytes): every storage once; ``state_names``: KV cache."""
    import torch
    seen, weights, state = set(), 0, 0
    items = list(module.named_parameters(remove_duplicate=False)) + \
        list(module.named_buffers(remove_duplicate=False))
    for name, mod in module.named_modules():
        for k, v in vars(mod).items():
            if isinstance(v, torch.Tensor):
                items.append((f"{name}.{k}" if name else k, v))
    for name, t in items:
        if t is None or t.is_meta:
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        n = t.untyped_storage().nbytes()
        if name in state_names:
            state += n
        else:
            weights += n
    return weights, state


def child(kind: str, path: str, cache_len: int) -> dict:
    import torch
    torch.set_num_threads(1)
    from qdsl.artifact.store import _state_targets
    from qdsl.compiler.loading import load_artifact_lm
    from qdsl.eval.hosting import load_float
    from qdsl.graph.capture import capture
    from qdsl.passes.pipeline import FLOAT_RUNTIME, PassContext, run
    from qdsl.runtime import kernels
    from qdsl.runtime.graphlm import GraphLM
    from qdsl.runtime.kernels import binary
    kernels.table()
    binary.available()
    rss0 = _settle()
    if kind == "artifact":
        lm = load_artifact_lm(path, max_cache_len=cache_len)
        module = lm.gm if hasattr(lm, "gm") else lm.model
        meta = json.loads((Path(path) / "qdsl_artifact.json").read_text())
        state = set(meta["int8"].get("runtime_state", []))
    else:
        model = load_float(path)
        if kind == "graph":
            gm = run(FLOAT_RUNTIME, capture(model, mode="generate", max_cache_len=cache_len).gm,
                     PassContext())
            del model
            lm, module = GraphLM(gm, cache_len, name=path), gm
            state = _state_targets(gm)    # the key/value cache (in-place-updated)
        else:
            lm, module, state = None, model, set()
    with torch.inference_mode():
        if lm is not None:
            lm.prefill(torch.zeros(1, 8, dtype=torch.long))
            lm.decode(1)
        else:
            module(input_ids=torch.zeros(1, 8, dtype=torch.long))
    rss1 = _settle()
    w, s = _tensor_bytes(module, state)
    tok = 0
    if getattr(lm, "tokenizer", None) is not None:   # the float rows load none: split it off
        lm.tokenizer = None
        tok = rss1 - _settle()
    return {"rss_delta_mb": (rss1 - rss0) / 2**20, "tokenizer_mb": tok / 2**20,
            "weights_mb": w / 2**20, "cache_mb": s / 2**20, "rss0_mb": rss0 / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="LABEL=NAME_OR_ARTIFACT (graph=NAME: captured)")
    ap.add_argument("--cache-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per model")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.cache_len)))
        return
    rows = {}
    for _ in range(a.rounds):                       # interleaved
        for spec in a.models:
            label, path = spec.split("=", 1)
            kind = "artifact" if (Path(path) / "qdsl_artifact.json").is_file() else \
                "graph" if label.startswith("graph") else "eager"
            p = subprocess.run([sys.executable, __file__, "--cache-len", str(a.cache_len),
                                "--child", kind, path, "x"], capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(f"{label}: {p.stderr[-1500:]}")
            rows.setdefault(label, []).append(json.loads(p.stdout.strip().splitlines()[-1]))
    print("| model | RSS delta at load MiB (runs) | of which tokenizer MiB | without it MiB "
          "| tensors: weights MiB | KV cache MiB |")
    print("|---|---|---|---|---|---|")
    for label, rs in rows.items():
        deltas = ", ".join(f"{r['rss_delta_mb']:.1f}" for r in rs)
        best = min(rs, key=lambda r: r["rss_delta_mb"])
        print(f"| {label} | {best['rss_delta_mb']:.1f} ({deltas}) | {best['tokenizer_mb']:.1f} "
              f"| {best['rss_delta_mb'] - best['tokenizer_mb']:.1f} "
              f"| {rs[0]['weights_mb']:.2f} | {rs[0]['cache_mb']:.2f} |")


if __name__ == "__main__":
    main()
