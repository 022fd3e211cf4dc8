"""Where ``qdsl bench``'s time goes: the machine (capability, threads, a quick read
bandwidth test), the bytes a decode step reads, the bandwidth bound, and llama.cpp's
``llama-bench`` run side by side on GGUF files (``--llamacpp BIN --gguf FILE``).

The bandwidth bound of decode is the weight bytes read per token divided by the
measured read bandwidth (gpt-fast's "GB/s" column, inverted): a GEMV reads every
weight once per token, so no kernel decodes faster than that. Embedding tables
that only gather rows are not counted (one row a token), unless a head shares them.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

from qdsl.errors import OptionError
from qdsl.passes.kv_cache import cache_tensors
from qdsl.runtime import kernels

BANDWIDTH_MB = 256          # the read test's buffer (larger than any cache)
EMBEDDING_TYPES = ("Embedding", "Int8Embedding", "PackedEmbedding")


def read_bandwidth_gbs(threads: int, mb: int = BANDWIDTH_MB, repeats: int = 4,
                       buffers: int = 3) -> float:
    """Read bandwidth (GB/s, 10^9 bytes): the highest of ``repeats`` ``torch.sum`` calls
    over each of ``buffers`` freshly allocated ``mb`` MiB float32 buffers.

    The highest, not the median: one buffer's speed depends on where its pages landed
    and on what else ran (2-thread medians of one buffer ranged 29-49 GB/s on a quiet
    machine), and the bound it sets must be one no kernel beats, so that decode's ratio
    to it is never flattered by a slow read test.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        best = 0.0
        for _ in range(buffers):
            x = torch.ones(mb * 2**20 // 4)
            x.sum()                     # first touch and warm-up
            for _ in range(repeats):
                t0 = time.perf_counter()
                x.sum()
                best = max(best, x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
            del x
        return best
    finally:
        torch.set_num_threads(old)


def weight_bytes_per_token(module: nn.Module) -> int:
    """Bytes of the parameters and buffers a decode step reads: all, each storage once,
    except key/value caches and gather-only embedding tables (a tied head counts), plus
    torch.ao dynamic linears' packed weights (held outside parameters and buffers)."""
    embedding_ptrs, other_ptrs = set(), set()
    for m in module.modules():
        own = [t for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))
               if t is not None and t.numel()]
        is_embedding = type(m).__name__ in EMBEDDING_TYPES
        for t in own:
            (embedding_ptrs if is_embedding else other_ptrs).add(t.untyped_storage().data_ptr())
    total, seen = 0, set()
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        if t is None or not t.numel() or "cache" in name.lower():
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or (ptr in embedding_ptrs and ptr not in other_ptrs):
            continue
        seen.add(ptr)
        total += t.untyped_storage().nbytes()
    for m in module.modules():          # torch.ao dynamic linears: packed params, no buffers
        if hasattr(m, "_packed_params") and callable(getattr(m, "weight", None)):
            w, b = m._packed_params._weight_bias()
            total += w.untyped_storage().nbytes() + (0 if b is None else b.nbytes)
    return total


def kv_cache_of(module: nn.Module) -> tuple[int, str] | None:
    """(bytes per cached position summed over every layer's keys and values, dtype) of a
    captured graph's static cache; None for a model without one (a transformers model's
    cache lives outside the module)."""
    if not isinstance(module, torch.fx.GraphModule):
        return None
    caches = cache_tensors(module)
    if not caches:
        return None
    per_position = sum(t.numel() // t.shape[2] * t.element_size() for t in caches.values())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in caches.values()})
    return per_position, "/".join(dtypes)


def machine(threads: int, bandwidth: bool = True) -> dict:
    """Capability, threads and (optionally) the read bandwidth, for a result's conditions."""
    cap = kernels.capability()
    out = {"capability": cap.name, "capability_text": cap.describe(),
           "torch_capability": cap.torch_capability, "cpu_model": cap.model,
           "forced_capability": cap.forced, "threads": threads,
           "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
                   if k in os.environ}}
    if bandwidth:
        out["bandwidth_gbs"] = read_bandwidth_gbs(threads)
    return out


def module_of(lm) -> nn.Module | None:
    """The module behind a CausalLM (a captured graph or a transformers model)."""
    return getattr(lm, "gm", None) or getattr(lm, "model", None)


# --------------------------------------------------------------------- llama.cpp

def check_llamacpp(binary: str | None, gguf: list[str]) -> None:
    """OptionError unless both or neither are given and they exist."""
    if not binary and not gguf:
        return
    if not binary or not gguf:
        raise OptionError("--llamacpp and --gguf go together: the llama-bench binary and "
                          "the GGUF file(s) it runs")
    if not (Path(binary).is_file() and os.access(binary, os.X_OK)):
        raise OptionError(f"--llamacpp {binary}: not an executable file")
    for f in gguf:
        if not Path(f).is_file():
            raise OptionError(f"--gguf {f}: no such file")


def _llama_bench(binary: str, gguf: str, args: list[str], repeats: int) -> dict:
    cmd = [binary, "-m", gguf, *args, "-r", str(repeats), "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise OptionError(f"llama-bench failed on {gguf} (exit {proc.returncode}): "
                          f"{proc.stderr.strip()[-500:]}")
    try:
        return json.loads(proc.stdout)[0]
    except (ValueError, IndexError, KeyError) as e:
        raise OptionError(f"llama-bench printed no JSON result for {gguf}: {e}") from e


def llamacpp_rows(binary: str, gguf: list[str], context: int, decode_tokens: int,
                  threads: int, repeats: int) -> list[dict]:
    """One hosting row per GGUF: prefill of ``context`` tokens, decode per token after
    ``context`` tokens (``-d``) and from an empty context, llama-bench's averages."""
    rows = []
    for f in gguf:
        t = ["-t", str(threads)]
        pp = _llama_bench(binary, f, ["-p", str(context), "-n", "0", *t], repeats)
        tg = _llama_bench(binary, f, ["-p", "0", "-n", str(decode_tokens), "-d", str(context),
                                      *t], repeats)
        tg0 = _llama_bench(binary, f, ["-p", "0", "-n", str(decode_tokens), *t], repeats)
        decode_ms = 1e3 / tg["avg_ts"]
        rows.append({"name": f"llama.cpp {Path(f).name} ({pp.get('model_type', '?')})",
                     "kind": "llama.cpp", "size_mb": Path(f).stat().st_size / 1e6,
                     "rss_load_mb": None, "peak_rss_mb": None,
                     "prefill_ms": 1e3 * context / pp["avg_ts"], "decode_ms": decode_ms,
                     "tokens_per_s": tg["avg_ts"],
                     "extra": {"decode_ms_empty_context": 1e3 / tg0["avg_ts"],
                               "weight_bytes_per_token": pp.get("model_size"),
                               "llama_bench": {"pp": pp, "tg": tg, "tg0": tg0}}})
    return rows
