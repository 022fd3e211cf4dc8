"""Module swap (gpt-fast style): replace every linear of an eager model with a
runtime module, for measuring the runtime modules before graph lowering.

``swap_linears(model, scheme)`` swaps every ``nn.Linear`` and transformers
``Conv1D`` (weight ``[in, out]``, transposed here) and the input embedding. A
tied output head shares the embedding's quantized buffers, so the tied weight
is stored once. On a ``meta`` model it only builds the structure, ready for
``load_state_dict(..., assign=True)`` (``load_lowered``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from qdsl.atomic import atomic_path
from qdsl.errors import ArtifactError
from qdsl.runtime.conv1d import linear_weight
from qdsl.runtime.int8 import Int8DynamicLinear, Int8Embedding, Int8WeightOnlyLinear
from qdsl.runtime.packed import PackedEmbedding, PackedLinear, weight_spec

W4_GROUP = 64  # w4 group size when it divides the input dim, else per channel


def _w4_spec(n: int):
    return weight_spec(4, W4_GROUP if n % W4_GROUP == 0 else None)


# scheme -> (linear from (weight [out, in], bias), embedding from weight [num, dim])
SCHEMES = {
    "w8a8-dynamic": (Int8DynamicLinear.from_float, Int8Embedding.from_float),
    "w8-weight-only": (Int8WeightOnlyLinear.from_float, Int8Embedding.from_float),
    "w4": (lambda w, b: PackedLinear.from_float(w, b, _w4_spec(w.shape[1])),
           lambda w: PackedEmbedding.from_float(w, _w4_spec(w.shape[1]))),
}
LOWERED_JSON = "qdsl_lowered.json"


def swap_linears(model: nn.Module, scheme: str) -> nn.Module:
    """Swap linears, Conv1Ds and the input embedding in place; returns ``model``."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; one of {', '.join(SCHEMES)}")
    make_linear, make_embedding = SCHEMES[scheme]
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    new_emb = make_embedding(emb.weight)
    for name, m in list(model.named_modules()):
        w = linear_weight(m)
        if w is None:
            continue
        if m is head and tied:                               # share the embedding's codes
            new = make_linear(torch.empty_like(w, device="meta"), head.bias)
            for buf in new.WEIGHT_BUFFERS:
                setattr(new, buf, getattr(new_emb, buf))
        else:
            new = make_linear(w, m.bias)
        model.set_submodule(name, new)
    model.set_input_embeddings(new_emb)
    return model


def save_lowered(model: nn.Module, scheme: str, out_dir: str | os.PathLike) -> Path:
    """Write config.json + model.safetensors (shared tensors once) + qdsl_lowered.json.

    ``scheme`` is the one ``swap_linears`` applied, or "fp32" for an unswapped model.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state, seen, aliases = {}, {}, {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape))
        if key in seen:
            aliases[k] = seen[key]
        else:
            seen[key], state[k] = k, v.contiguous()
    model.config.save_pretrained(out)
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    meta = {"scheme": scheme, "aliases": aliases}
    with atomic_path(out / LOWERED_JSON) as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    return out


def load_lowered(path: str | os.PathLike, attn: str = "sdpa") -> nn.Module:
    """Meta-device model from config.json, ``swap_linears``, ``load_state_dict(assign=True)``."""
    d = Path(path)
    if not (d / LOWERED_JSON).exists():
        raise ArtifactError(f"{d}: not a lowered model (no {LOWERED_JSON})")
    meta = json.loads((d / LOWERED_JSON).read_text())
    config = AutoConfig.from_pretrained(d)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    if meta["scheme"] != "fp32":
        swap_linears(model, meta["scheme"])
    state = load_file(str(d / "model.safetensors"))
    state.update({k: state[v] for k, v in meta["aliases"].items()})
    model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k, v in model.state_dict().items() if v.is_meta]
    if missing:
        raise ArtifactError(f"{d}: tensors missing from model.safetensors: {missing[:5]}")
    _materialize_nonpersistent(model)
    return model.eval()


def _materialize_nonpersistent(model: nn.Module) -> None:
    """Rebuild non-persistent buffers left on meta (rotary ``inv_freq``) from a fresh module."""
    for name, mod in model.named_modules():
        if not any(b is not None and b.is_meta for b in mod._buffers.values()):
            continue
        try:
            fresh = type(mod)(mod.config)                    # transformers modules take config
        except (AttributeError, TypeError) as e:
            raise ArtifactError(f"cannot rebuild the buffers of {name} after loading") from e
        for bname, buf in mod._buffers.items():
            if buf is not None and buf.is_meta:
                mod._buffers[bname] = fresh._buffers[bname]
