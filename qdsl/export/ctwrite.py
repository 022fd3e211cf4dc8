"""``qdsl export ARTIFACT --format compressed-tensors``: a model directory vLLM loads
(``config.json`` with a ``quantization_config`` of ``quant_method: compressed-tensors``,
``model.safetensors``, the tokenizer).

Each quantized linear becomes one compressed module, from qdsl's codes and scales:

* 8 bits, ``int-quantized``: ``weight`` int8 codes, ``weight_scale`` float32
  ``[out, groups]`` (``[out, 1]`` per channel, ``[1]`` per tensor);
* 4 bits, ``pack-quantized``: ``weight_packed`` int32 (eight codes a word, column
  ``8j + k`` in bits ``4k..4k+3``, stored ``code + 8``), ``weight_shape`` int64
  ``[out, in]``, ``weight_scale``;
* asymmetric grids: ``weight_zero_point`` (codes and zero points moved to the signed
  grid: qdsl's ``[0, 2^b - 1]`` minus ``2^(b-1)``; 4-bit zero points packed along rows);
* the linear's input quantizer, if any: ``input_activations`` of its scheme (dynamic
  per token / per tensor, or static per tensor with ``input_scale``).

Modules with the same scheme share one ``config_groups`` entry whose ``targets`` are
their exact module names; float linears are listed in ``ignore``. Everything else
(norms, embeddings, biases) is dense float32; a quantized embedding is written
dequantized (exactly qdsl's values: compressed-tensors quantizes linears only).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..atomic import OutputKind, atomic_dir
from ..config.spec import GroupWise, PerChannel, PerTensor, PerToken, TensorSpec
from ..errors import ExportError
from ..passes.int8_exec import weight_inputs
from .weights import Weight, collect

MARKER = "qdsl_export.json"
CT_DIR = OutputKind("compressed-tensors export", MARKER,
                    (MARKER, "config.json", "model.safetensors", "generation_config.json",
                     "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "chat_template.jinja", "vocab.json", "merges.txt"), error=ExportError)
ARCHS = ("llama", "qwen2")


def _weight_args(w: Weight) -> dict:
    spec, g = w.spec, w.spec.granularity
    if spec.bits not in (4, 8):
        raise ExportError(f"node {w.node}: {spec.describe()}: vLLM's compressed-tensors "
                          "kernels take 4- or 8-bit integer weights; nearest: "
                          f"w{4 if spec.bits < 4 else 8} {'sym' if spec.symmetric else 'asym'} "
                          "per_channel")
    strategy = ("group" if isinstance(g, GroupWise) else "channel" if isinstance(g, PerChannel)
                else "tensor" if isinstance(g, PerTensor) else None)
    if strategy is None:
        raise ExportError(f"node {w.node}: weight granularity {g.name} has no compressed-tensors "
                          "strategy (tensor, channel, group)")
    return {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric,
            "strategy": strategy, "group_size": g.size if strategy == "group" else None,
            "dynamic": False, "observer": "minmax"}


def _input_args(node: str, spec: TensorSpec | None) -> dict | None:
    if spec is None or not spec.quantized:
        return None
    g = spec.granularity
    ok = spec.bits == 8 and (isinstance(g, PerToken) or isinstance(g, PerTensor))
    if not ok:
        raise ExportError(f"node {node}: its input quantizer {spec.describe()} is not a "
                          "compressed-tensors input scheme; nearest: a8 sym per_token dynamic")
    return {"num_bits": 8, "type": "int", "symmetric": spec.symmetric,
            "strategy": "token" if isinstance(g, PerToken) else "tensor",
            "dynamic": bool(spec.dynamic or isinstance(g, PerToken)), "observer": "minmax"}


def _pack4(codes: torch.Tensor, dim: int) -> torch.Tensor:
    """Signed 4-bit codes (int) -> int32 words of eight along ``dim`` (0 or 1), code
    ``8j + k`` in bits ``4k..4k+3`` as ``code + 8`` (compressed-tensors' layout)."""
    v = (codes.to(torch.int64) + 8)
    v = v.t() if dim == 0 else v
    rows, cols = v.shape
    v = torch.nn.functional.pad(v, (0, (-cols) % 8)).reshape(rows, -1, 8)
    words = (v << (4 * torch.arange(8))).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return (words.t() if dim == 0 else words).contiguous()


def _module_tensors(w: Weight, module: str, wargs: dict, in_args: dict | None,
                    act) -> dict[str, torch.Tensor]:
    bits, offset = w.spec.bits, 0 if w.spec.symmetric else 2 ** (w.spec.bits - 1)
    codes, zp = w.codes - offset, w.zero_point - offset
    scale = w.scale[:1, :1].reshape(1) if wargs["strategy"] == "tensor" else w.scale
    out = {f"{module}.weight_scale": scale.float().contiguous()}
    if bits == 8:
        out[f"{module}.weight"] = codes.to(torch.int8).contiguous()
    else:
        out[f"{module}.weight_packed"] = _pack4(codes, 1)
        out[f"{module}.weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
    if not w.spec.symmetric:
        zp = zp[:1, :1].reshape(1) if wargs["strategy"] == "tensor" else zp
        out[f"{module}.weight_zero_point"] = (zp.to(torch.int8).contiguous() if bits == 8
                                              else _pack4(zp, 0))
    if in_args is not None and not in_args["dynamic"]:
        out[f"{module}.input_scale"] = act.scale.detach().float().reshape(1).clone()
        if not in_args["symmetric"]:
            zero = act.zero_point.detach().reshape(1) - 128      # qdsl's [0, 255] -> int8
            out[f"{module}.input_zero_point"] = zero.to(torch.int8).clone()
    return out


def write_compressed_tensors(q, config, tokenizer, out: str | os.PathLike, *,
                             force: bool = False) -> dict:
    """Write ``q`` (fake-lowered QuantizedModel of ``config``'s model) as a
    compressed-tensors model directory ``out``, atomically; returns the report."""
    if getattr(config, "model_type", None) not in ARCHS:
        raise ExportError(f"model type {getattr(config, 'model_type', None)!r}: the "
                          f"compressed-tensors export covers {', '.join(ARCHS)} (GPT-2's Conv1D "
                          "weights are transposed by vLLM at load, which a packed weight "
                          "cannot take)")
    weights = collect(q)
    inputs = weight_inputs(q.gm, q.named, q.plan)
    groups: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    ignore, rows, fed = [], [], set()
    for w in weights.values():
        module = w.name.removesuffix(".weight")
        kind = inputs.get(w.node, ("",))[0] if w.node else ""
        if not w.quantized or kind != "linear":
            if w.node is not None and kind == "" and w.name.endswith(".weight") \
                    and w.tensor.dim() == 2 and "embed" not in w.name:
                ignore.append(module)   # a float linear
            tensors[w.name] = w.tensor.contiguous()
            rows.append({"tensor": w.name, "node": w.node, "type": "dense float32",
                         "spec": w.spec.describe() if w.spec is not None else "float"})
            continue
        _, producer, in_spec, act_target = inputs[w.node]
        wargs, in_args = _weight_args(w), _input_args(w.node, in_spec)
        if producer is not None and in_args is not None:
            fed.add(producer)
        fmt = "int-quantized" if w.spec.bits == 8 else "pack-quantized"
        key = json.dumps([wargs, in_args, fmt], sort_keys=True)
        group = groups.setdefault(key, {"targets": [], "weights": wargs,
                                        "input_activations": in_args,
                                        "output_activations": None, "format": fmt})
        group["targets"].append(module)
        act = q.gm.get_submodule(act_target) if act_target else None
        tensors.update(_module_tensors(w, module, wargs, in_args, act))
        rows.append({"tensor": w.name, "node": w.node, "type": fmt, "spec": w.spec.describe()})
    _check_activations(q, fed)
    formats = {g["format"] for g in groups.values()}
    qconfig = {"quant_method": "compressed-tensors", "quantization_status": "compressed",
               "format": formats.pop() if len(formats) == 1 else "mixed-precision",
               "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
               "ignore": sorted(set(ignore)), "kv_cache_scheme": None}
    cfg = config.to_dict()
    cfg["quantization_config"] = qconfig
    if cfg.get("tie_word_embeddings"):   # a compressed or different lm_head: untie it
        compressed = any(k.startswith("lm_head.") and k != "lm_head.weight" for k in tensors)
        if compressed or ("lm_head.weight" in tensors
                          and not torch.equal(tensors["lm_head.weight"], _embed(tensors))):
            cfg["tie_word_embeddings"] = False
        else:
            tensors.pop("lm_head.weight", None)
    with atomic_dir(out, force=force, kind=CT_DIR) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"format": "compressed-tensors",
                                               "tensors": rows}, indent=1) + "\n")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["type"]] = counts.get(r["type"], 0) + 1
    size = sum(p.stat().st_size for p in Path(out).iterdir() if p.is_file())
    return {"format": "compressed-tensors", "path": str(out), "tensors": rows, "types": counts,
            "quantization_config": qconfig, "requantized": [], "bytes": size}


def _embed(tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    return next((t for k, t in tensors.items() if k.endswith("embed_tokens.weight")), None)


def _check_activations(q, fed: set[str]) -> None:
    """Every quantized activation must be a linear's input scheme: compressed-tensors
    (and vLLM) quantize nothing else."""
    bad = [f"{n.name} ({q.plan[n.name].activation.describe()})" for n in q.named.nodes
           if q.plan[n.name].activation.quantized and n.name not in fed]
    if bad:
        raise ExportError(f"{len(bad)} quantized activation(s) are not inputs of quantized "
                          "linears, which is all compressed-tensors quantizes: "
                          + ", ".join(bad[:8]) + (" ..." if len(bad) > 8 else "")
                          + "; make them float (`-> a32`/skip) or export to gguf")
