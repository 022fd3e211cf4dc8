"""``qdsl export ARTIFACT --format gguf``: one GGUF file llama.cpp loads.

Quantized weights go in as GGUF blocks written from qdsl's codes and scales
(``ggufblocks``), proven exact by dequantizing them back; float weights as F32
(fp16 / bf16 specs as F16 / BF16, exact too). A weight that cannot go in exactly
is an error naming every such node, its reason and the nearest spec that exports,
unless ``requantize``: then gguf-py's reference quantizer re-rounds it from qdsl's
dequantized weight and the report lists it with its error.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..atomic.files import atomic_path
from ..errors import ExportError
from . import ggufblocks as gb
from .ggufmeta import add_arch, add_vocab, arch_of, rope_rows, tensor_names
from .weights import Weight, collect


def _oriented_for(w: Weight, arch: str, config) -> Weight:
    """LLaMA q / k weights (codes and per-row scales too) in llama.cpp's rope row order."""
    if arch != "LLAMA" or not w.name.endswith(("q_proj.weight", "k_proj.weight",
                                              "q_proj.bias", "k_proj.bias")):
        return w
    heads = config.num_attention_heads if ".q_proj." in w.name else config.num_key_value_heads
    p = (lambda t: None if t is None else rope_rows(t, heads))
    return Weight(w.name, p(w.tensor), w.node, w.spec, p(w.codes), p(w.scale), p(w.zero_point))


def _same(a: Weight, b: Weight) -> bool:
    return a.spec == b.spec and torch.equal(a.tensor, b.tensor)


def _float_data(w: Weight) -> tuple[np.ndarray, str | None]:
    dtype = w.spec.float_dtype if w.spec is not None and not w.spec.quantized else "fp32"
    a = w.tensor.numpy().astype(np.float32)
    if w.tensor.dim() < 2 or dtype == "fp32":
        return a, None
    if dtype == "fp16":
        return a.astype(np.float16), None
    bits = torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy()   # bf16
    return bits.view(np.uint8).reshape(a.shape[0], -1), "BF16"


def plan_tensors(q, config, *, requantize: bool = False) -> tuple[list, list[dict]]:
    """[(gguf name, data, raw type or None, row)] and the report rows, one per tensor;
    ExportError listing every weight that cannot go in exactly (without requantize)."""
    arch, _ = arch_of(config)
    weights = collect(q)
    name_of = tensor_names(arch, q.named.blocks)
    embed = next((w for w in weights.values() if w.name.endswith(("embed_tokens.weight",
                                                                   "wte.weight"))), None)
    items, rows, refused = [], [], []
    for w in weights.values():
        if w.name == "lm_head.weight" and embed is not None and _same(w, embed):
            continue               # tied and quantized alike: llama.cpp reuses token_embd
        w = _oriented_for(w, arch, config)
        gname = name_of(w.name)
        row = {"tensor": gname, "source": w.name, "node": w.node,
               "spec": w.spec.describe() if w.spec is not None else "float"}
        if not w.quantized:
            data, raw = _float_data(w)
            row["type"] = raw or ("F16" if data.dtype == np.float16 else "F32")
            items.append((gname, data, raw, row))
            rows.append(row)
            continue
        verdict = gb.block_type(w)
        reason = verdict.reason
        if reason is None:
            data, reason = gb.exact_blocks(w, verdict.qtype)
        if reason is not None:
            if not requantize:
                nearest = verdict.nearest or gb.nearest_spec(w.spec.bits, w.spec.symmetric)
                refused.append(f"node {w.node} ({w.name}, {row['spec']}): {reason}; nearest "
                               f"exportable spec: {nearest}")
                continue
            data, err = gb.requantize(w.tensor, verdict.qtype)
            row.update(requantized=True, reason=reason, **err)
        row["type"] = verdict.qtype
        items.append((gname, data, None if verdict.qtype == "F16" else verdict.qtype, row))
        rows.append(row)
    if refused:
        raise ExportError(f"{len(refused)} weight(s) cannot be written to GGUF exactly "
                          "(--requantize re-rounds them and reports the error):\n  "
                          + "\n  ".join(refused))
    return items, rows


def write_gguf(q, config, tokenizer, out: str | os.PathLike, *, requantize: bool = False,
               vocab: bool = True, name: str | None = None) -> dict:
    """Write ``q`` (a fake-lowered QuantizedModel of ``config``'s model) to ``out``
    atomically; returns the report (tensors, types, what was re-rounded)."""
    import gguf

    arch, _ = arch_of(config)
    items, rows = plan_tensors(q, config, requantize=requantize)
    out = Path(out)
    with atomic_path(out, suffix=".tmp.gguf") as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch]])
        writer.add_name(name or out.stem)
        add_arch(writer, config, arch)
        types = {r["type"] for r in rows}
        ftype = next((getattr(gguf.LlamaFileType, f"MOSTLY_{t}") for t in ("Q4_0", "Q4_1", "Q8_0")
                      if t in types), gguf.LlamaFileType.ALL_F32)
        writer.add_file_type(ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab_info = None
        if vocab:
            if tokenizer is None:
                raise ExportError("the model has no tokenizer to write (llama.cpp needs one); "
                                  "give the model directory, or --no-vocab for a weights-only file")
            vocab_info = add_vocab(writer, tokenizer, config)
        for gname, data, raw, _ in items:
            writer.add_tensor(gname, data, raw_dtype=None if raw is None
                              else gguf.GGMLQuantizationType[raw])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["type"]] = counts.get(r["type"], 0) + 1
    return {"format": "gguf", "path": str(out), "arch": arch.lower(), "tensors": rows,
            "types": counts, "requantized": [r for r in rows if r.get("requantized")],
            "vocab": vocab_info, "bytes": out.stat().st_size}
