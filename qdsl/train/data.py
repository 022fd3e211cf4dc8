"""Training data: a token stream per split, and the batch of each step.

``stdlib`` (the reference model's corpus, ``models.stdlib``: train / valid splits) or
a directory of ``.py`` files (about 5% of the files, by a hash of the relative path,
held out). The streams are tokenised once and cached in the run directory
(``tokens.safetensors``, int32: no pickle). The batch of step s is drawn from
``numpy.random.default_rng([seed, s])``, so a resumed run sees the same data as an
uninterrupted one, and the held-out windows are fixed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..atomic.files import atomic_path
from ..errors import ModelError
from ..models.stdlib import stdlib_files

HELD_OUT_PER_MILLE = 50
MAX_FILE_BYTES = 1 << 20


def source_files(data: str) -> dict[str, list[Path]]:
    """{"train": [...], "valid": [...]} files of ``data`` ("stdlib" or a directory)."""
    if data == "stdlib":
        return {"train": stdlib_files("train"), "valid": stdlib_files("valid")}
    root = Path(data)
    if not root.is_dir():
        raise ModelError(f"--data {data}: not a directory of source files (or 'stdlib')")
    out: dict[str, list[Path]] = {"train": [], "valid": []}
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:4], "big") % 1000
        out["valid" if h < HELD_OUT_PER_MILLE else "train"].append(p)
    if not out["train"] or not out["valid"]:
        raise ModelError(f"--data {data}: needs .py files for both the train and held-out "
                         f"splits, found {len(out['train'])} and {len(out['valid'])}")
    return out


def encode(files: list[Path], tokenizer, max_tokens: int) -> torch.Tensor:
    """The files' tokens, each followed by EOS, as one int32 stream (at most max_tokens)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids: list[int] = []
    for f in files:
        if not f.is_file() or f.stat().st_size > MAX_FILE_BYTES:
            continue
        ids.extend(tokenizer(f.read_text(encoding="utf-8", errors="replace"),
                             add_special_tokens=False)["input_ids"])
        ids.append(eos)
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.int32)


def token_streams(data: str, tokenizer, run: Path, max_tokens: int) -> dict[str, torch.Tensor]:
    """The cached streams of ``run`` if they match (data, tokenizer, budget), else encoded."""
    cache = run / "tokens.safetensors"
    key = json.dumps({"data": str(data), "vocab": len(tokenizer),
                      "max_tokens": max_tokens}, sort_keys=True)
    if cache.exists():
        with safe_open(str(cache), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return load_file(str(cache))
    files = source_files(data)
    streams = {split: encode(fs, tokenizer, max_tokens if split == "train" else max_tokens // 10)
               for split, fs in files.items()}
    run.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache, suffix=".tmp.safetensors") as tmp:
        save_file(streams, str(tmp), metadata={"key": key})
    return streams


def batch(stream: torch.Tensor, step: int, seed: int, size: int, seq_len: int) -> torch.Tensor:
    """The ``size`` windows of ``seq_len`` tokens of step ``step`` (int64 [size, seq_len])."""
    if len(stream) <= seq_len:
        raise ModelError(f"the training data has {len(stream)} tokens, fewer than one "
                         f"window of {seq_len}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(stream) - seq_len, size)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()]).long()


def held_out(stream: torch.Tensor, n: int, seq_len: int) -> torch.Tensor:
    """``n`` fixed, evenly spaced windows of the held-out stream."""
    n = max(1, min(n, len(stream) // seq_len))
    stride = (len(stream) - seq_len) // n if n > 1 else 0
    return torch.stack([stream[i * stride:i * stride + seq_len] for i in range(n)]).long()
