"""qdsl export --format compressed-tensors on a tiny LLaMA: the directory's
quantization_config parses as compressed-tensors' own QuantizationConfig, and its
compressors decompress every module to exactly qdsl's dequantized weight (W8A8
dynamic int-quantized, W4A16 pack-quantized, asymmetric grids with zero points).
vLLM itself does not run on these machines (no GPU): this checks the format with the
library vLLM uses to read it."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors.base import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import load_file

import qdsl
from qdsl.errors import ExportError
from qdsl.export import export
from tiny import tiny, tiny_ids



def _recipe_w8a8() -> str:
    from pathlib import Path
    return (Path(__file__).parents[2] / "recipes" / "int8" / "w8a8_dynamic.qrec").read_text()


CASES = {
    "w8a8": (_recipe_w8a8(), "int-quantized", "channel", {"token"}),
    "w4a16": ("* -> w4 sym group(size=16)\nlm_head? -> skip\n", "pack-quantized", "group",
              {None}),
    "w4-asym": ("* -> w4 asym group(size=16)\n", "pack-quantized", "group", {None}),
    "w8-asym": ("* -> w8 asym per_channel\n", "int-quantized", "channel", {None}),
    # q / k / v read ln_1's static per-tensor codes (input_scale); the rest float inputs
    "w8a8-static": ("* -> w8 sym per_channel\nblock.*.ln_1 -> a8 sym per_tensor\n",
                    "int-quantized", "channel", {"tensor", None}),
}


def fake_weight(q, node: str) -> torch.Tensor:
    return getattr(q.gm, "qdsl_weight__" + node.replace(".", "_")).detach().float()


@pytest.mark.parametrize("case", list(CASES))
def test_compressed_tensors_decompress_to_qdsl_weights(case, tmp_path):
    recipe, fmt, strategy, act = CASES[case]
    m = tiny("llama", tie_word_embeddings=True)
    q = qdsl.compile(m, recipe, calib=tiny_ids(m, 2, 8))
    q.save(tmp_path / "a")
    rep = export(tmp_path / "a", "compressed-tensors", tmp_path / "ct", model=m)
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == fmt
    qc = QuantizationConfig.model_validate(cfg)        # the library's own schema
    sd = load_file(tmp_path / "ct" / "model.safetensors")
    modules = {n.module: n.name for n in q.named.nodes if n.has_weight}
    checked = 0
    assert {s.input_activations.strategy if s.input_activations else None
            for s in qc.config_groups.values()} == act
    for scheme in qc.config_groups.values():
        assert scheme.weights.strategy == strategy
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        for module in scheme.targets:
            local = {k[len(module) + 1:]: v for k, v in sd.items() if k.startswith(module + ".")}
            assert "weight" not in local or local["weight"].dtype == torch.int8
            if scheme.input_activations and not scheme.input_activations.dynamic:
                assert local["input_scale"].shape == (1,)
            w = compressor.decompress(local, scheme)["weight"]
            assert torch.equal(w.float(), fake_weight(q, modules[module])), module
            checked += 1
    assert checked == sum(n.startswith("block.") for n in modules.values()) + (case != "w4a16")
    assert ("lm_head" in cfg["ignore"]) == (case == "w4a16")
    full = json.loads((tmp_path / "ct" / "config.json").read_text())
    # tied in the source, but the embedding is written dequantized: a compressed lm_head,
    # or a float one (w4a16 skips it), must load as its own module in vLLM
    assert full["tie_word_embeddings"] is False
    dense_head = "lm_head.weight" in sd and sd["lm_head.weight"].is_floating_point()
    assert dense_head == (case == "w4a16")   # int-quantized heads: `weight` holds int8 codes
    assert rep["types"]["dense float32"] >= 5      # norms + the (dequantized) embedding


def test_compressed_tensors_refuses_what_it_cannot_carry(tmp_path):
    m = tiny("llama")
    q = qdsl.compile(m, "* -> w8a8\n", calib=tiny_ids(m, 2, 8))   # every activation, static
    q.save(tmp_path / "a")
    with pytest.raises(ExportError, match=r"quantized activation\(s\) are not inputs of "
                                          r"quantized linears"):
        export(tmp_path / "a", "compressed-tensors", tmp_path / "ct", model=m)
    q = qdsl.compile(m, "* -> w3 sym per_channel\n", calib=tiny_ids(m, 2, 8))
    q.save(tmp_path / "b")
    with pytest.raises(ExportError, match=r"^node block\.0\.attn\.q: w3 sym per_channel "
                                          r"minmax: vLLM's compressed-tensors kernels take 4- or "
                                          r"8-bit integer weights; nearest: w4 sym per_channel"):
        export(tmp_path / "b", "compressed-tensors", tmp_path / "ct", model=m)
    assert not (tmp_path / "ct").exists()
