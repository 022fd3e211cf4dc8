"""An artifact's tensors and model config checked before use: a safetensors header is
read and checked against the file size before any tensor is (a pickle, a truncated
file, an offset past the end: refused without allocating); stored float tensors are
finite; scales and zero points are on their grid; model/config.json is bounded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import ArtifactError
from ..quant.primitives import qrange
from .files import read_json, regular_file
from .schema import _show

MAX_ST_HEADER = 100 << 20       # the safetensors library's own limit


# --------------------------------------------------------------------------- safetensors

_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}


def read_safetensors(d: Path, rel: str) -> dict:
    """Tensors of a safetensors file whose header was checked against the file's size
    first (so nothing larger than the file is ever allocated); float tensors finite."""
    size = regular_file(d, rel).st_size
    where = f"artifact {d}: {rel}"
    with open(d / rel, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(size - 8, MAX_ST_HEADER):
            raise ArtifactError(f"{where} is not a safetensors file (truncated, or its header "
                                "is damaged)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ArtifactError(f"{where}: the safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{where}: the safetensors header is not an object")
    data = size - 8 - n
    for name, e in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(e, dict) and e.get("dtype") in _ST_ITEMSIZE
              and isinstance(e.get("shape"), list) and len(e["shape"]) <= 16
              and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 48
                      for s in e["shape"])
              and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) for o in e["data_offsets"]))
        if ok:
            lo, hi = e["data_offsets"]
            ok = 0 <= lo <= hi <= data and hi - lo == math.prod(e["shape"]) * _ST_ITEMSIZE[e["dtype"]]
        if not ok:
            raise ArtifactError(f"{where}: the header entry of tensor {_show(name)} is damaged "
                                "or points past the end of the file")
    try:
        tensors = load_file(str(d / rel))
    except Exception as e:  # safetensors' own error type; any failure here is damage
        raise ArtifactError(f"{where} cannot be read: {str(e)[:200]}") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{where}: tensor {name} holds NaN or infinite values")
    return tensors


def check_quant_tensors(d: Path, meta: dict, plan: dict, tensors: dict) -> None:
    """quant_params.safetensors holds each quantizer's tensors: positive finite scales,
    integer zero points on the quantizer's grid, PEG permutations that are
    permutations; an activation's scale is 0-d (per tensor) or 1-d (PEG)."""
    where = f"artifact {d}: quant_params.safetensors"
    need: dict[str, tuple | None] = {}  # tensor name -> (bits, symmetric), None: optional
    for k, c in meta["quantizers"]["activations"].items():
        if c["type"] == "FakeQuant":
            grid = (c["spec"]["bits"], c["spec"]["symmetric"])
            need.update({f"act.{k}.scale": grid, f"act.{k}.zero_point": grid,
                         f"act.{k}.perm": None})
            scale, zp = tensors.get(f"act.{k}.scale"), tensors.get(f"act.{k}.zero_point")
            perm = tensors.get(f"act.{k}.perm")
            if scale is not None and (scale.dim() > 1 or zp is None or zp.shape != scale.shape
                                      or (perm is not None and perm.shape != scale.shape)):
                raise ArtifactError(f"{where}: the tensors of act.{k} do not have matching "
                                    "0-d or 1-d shapes")
    stored_in_model = meta.get("int8", {}).get("weight_qparams", {})
    specs = {e["name"]: e["weight"] for e in plan["entries"] if e["weight"]}
    for k in meta["quantizers"]["weights"]:
        for part in ("scale", "zero_point"):
            key = f"weight.{k}.{part}"
            if key not in stored_in_model:
                need[key] = (specs[k]["bits"], specs[k]["symmetric"])
    for k in meta["quantizers"].get("smooth", ()):  # SmoothQuant scales: positive floats
        need[f"smooth.{k}.scale"] = (8, True)     # (the grid is unused for a .scale)
    kept = meta["quantizers"].get("codes", []) + meta["quantizers"].get("in_scales", [])
    if set(kept) - set(meta["quantizers"]["weights"]):
        raise ArtifactError(f"{where}: codes or input scales of weights without a quantizer: "
                            f"{sorted(set(kept) - set(meta['quantizers']['weights']))[:3]}")
    for k in meta["quantizers"].get("codes", []):  # GPTQ / AWQ codes, on the weight's grid
        if f"weight.{k}.codes" not in stored_in_model:
            need[f"weight.{k}.codes"] = (specs[k]["bits"], specs[k]["symmetric"])
    for k in meta["quantizers"].get("in_scales", []):  # AWQ: positive, like a scale
        if f"weight.{k}.in_scale" not in stored_in_model:
            need[f"weight.{k}.in_scale"] = (0, True)  # required; no grid
    for key, grid in need.items():
        required = grid is not None
        t = tensors.get(key)
        if t is None:
            if required:
                raise ArtifactError(f"{where}: tensor {key} is missing")
            continue
        if key.endswith((".scale", ".in_scale")) and not (
                t.is_floating_point() and bool((t > 0).all()) and bool(t.isfinite().all())):
            raise ArtifactError(f"{where}: tensor {key} must hold positive scales")
        if key.endswith(".in_scale"):
            continue
        if key.endswith(".codes") and t.numel():
            qmin, qmax = qrange(*grid)
            if t.is_floating_point() or int(t.min()) < qmin or int(t.max()) > qmax:
                raise ArtifactError(f"{where}: tensor {key} holds codes outside the "
                                    f"{grid[0]}-bit grid {qmin}..{qmax}")
        if not key.endswith(".scale"):
            if t.is_floating_point() or t.dtype == torch.bool:
                raise ArtifactError(f"{where}: tensor {key} must be an integer tensor")
        if key.endswith(".zero_point") and t.numel():
            qmin, qmax = qrange(*grid)
            if int(t.min()) < qmin or int(t.max()) > qmax:
                raise ArtifactError(f"{where}: tensor {key} holds zero points outside the "
                                    f"{grid[0]}-bit grid {qmin}..{qmax}")
        if key.endswith(".perm") and not (t.dim() == 1 and torch.equal(
                torch.sort(t).values, torch.arange(t.numel(), dtype=t.dtype))):
            raise ArtifactError(f"{where}: tensor {key} is not a permutation")
    extra = set(tensors) - set(need)
    if extra:
        raise ArtifactError(f"{where}: tensors no quantizer uses: {sorted(extra)[:3]}")


# --------------------------------------------------------------------------- model/config.json

# config keys that size a transformers model, and the largest value a real one has
_CONFIG_BOUNDS = {"vocab_size": 1 << 24, "hidden_size": 1 << 17, "n_embd": 1 << 17,
                  "intermediate_size": 1 << 20, "n_inner": 1 << 20, "head_dim": 1 << 14,
                  "num_hidden_layers": 4096, "n_layer": 4096, "num_attention_heads": 1 << 14,
                  "n_head": 1 << 14, "num_key_value_heads": 1 << 14, "rotary_dim": 1 << 14,
                  "n_positions": 1 << 24, "max_position_embeddings": 1 << 24, "n_ctx": 1 << 24}


def check_config(d: Path) -> dict:
    """model/config.json: an object whose size keys are integers in sane bounds."""
    config = read_json(d, "model/config.json")
    if not isinstance(config, dict):
        raise ArtifactError(f"artifact {d}: model/config.json must be an object")
    for k, hi in _CONFIG_BOUNDS.items():
        v = config.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= hi):
            raise ArtifactError(f"artifact {d}: model/config.json: {k} must be an integer "
                                f"0..{hi}, got {_show(v)}")
    return config
