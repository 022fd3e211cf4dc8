"""qdsl export --format gguf on tiny models: the file read back with gguf-py holds
exactly the weights qdsl computes with (Q8_0 / Q4_0 / Q4_1 from qdsl's codes), the
block layouts, the refusal of grids GGUF cannot carry, --requantize, the vocabulary."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from hypothesis import given
from hypothesis import strategies as st

import qdsl
from qdsl.errors import ExportError
from qdsl.export import export
from qdsl.export.ggufblocks import encode
from qdsl.export.weights import Weight
from qdsl.config.spec import GroupWise, TensorSpec
from tiny import tiny, tiny_ids

W8 = "set export = gguf\n* -> w8 sym group(size=32)\n"
W4 = "set export = gguf\n* -> w4 sym group(size=32)\nlm_head? -> skip\n"
W4_ASYM = "set export = gguf\n* -> w4 asym group(size=32)\n"
# GGUF name -> canonical node, per family (the layer part: blk.N.<key>)
LLAMA = {"attn_q": "attn.q", "attn_k": "attn.k", "attn_v": "attn.v", "attn_output": "attn.out",
         "ffn_gate": "mlp.gate", "ffn_up": "mlp.up", "ffn_down": "mlp.down"}
GPT2 = {"attn_qkv": "attn.qkv", "attn_output": "attn.out", "ffn_up": "mlp.c_fc",
        "ffn_down": "mlp.c_proj"}

_CACHE: dict = {}


def compiled(family: str, recipe: str, tmp_path_factory):
    """(model, QuantizedModel, artifact dir), compiled once per (family, recipe)."""
    if (family, recipe) not in _CACHE:
        m = tiny(family)
        q = qdsl.compile(m, recipe, calib=tiny_ids(m, 2, 8))
        out = tmp_path_factory.mktemp("art") / "a"
        q.save(out)
        _CACHE[family, recipe] = m, q, out
    return _CACHE[family, recipe]


def fake_weight(q, node: str) -> torch.Tensor:
    """What qdsl computes with for a quantized node: its fake-quantized weight."""
    return getattr(q.gm, "qdsl_weight__" + node.replace(".", "_")).detach().float()


def expected(family: str, q, m) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> qdsl's weight [out, in], written independently of the exporter."""
    c = m.config
    out = {"token_embd.weight": fake_weight(q, "embed")}
    table = LLAMA if family == "llama" else GPT2
    for b in range(c.num_hidden_layers):
        for key, node in table.items():
            w = fake_weight(q, f"block.{b}.{node}")
            if family == "gpt2":
                w = w.t()                                  # Conv1D [in, out]
            if key in ("attn_q", "attn_k"):                # llama.cpp's rope row order
                h = c.num_attention_heads if key == "attn_q" else c.num_key_value_heads
                w = w.reshape(h, 2, w.shape[0] // h // 2, -1).transpose(1, 2).reshape(w.shape)
            out[f"blk.{b}.{key}.weight"] = w
    return out


def read_back(path) -> dict[str, tuple[str, np.ndarray]]:
    r = gguf.GGUFReader(path)
    res = {}
    for t in r.tensors:
        shape = [int(x) for x in reversed(t.shape)]
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            a = np.asarray(t.data, dtype=np.float32).reshape(shape)
        else:
            a = gguf_dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        res[t.name] = (t.tensor_type.name, a)
    return res


@pytest.mark.parametrize("family,recipe,qtype", [("llama", W8, "Q8_0"), ("gpt2", W8, "Q8_0"),
                                                 ("llama", W4, "Q4_0"), ("gpt2", W4, "Q4_0")])
def test_gguf_read_back_equals_qdsl_weights(family, recipe, qtype, tmp_path, tmp_path_factory):
    m, q, art = compiled(family, recipe, tmp_path_factory)
    rep = export(art, "gguf", tmp_path / "m.gguf", model=m, vocab=False)
    assert rep["requantized"] == []
    got = read_back(tmp_path / "m.gguf")
    want = expected(family, q, m)
    for name, w in want.items():
        t, a = got[name]
        assert t == qtype, name
        assert np.array_equal(a, w.numpy()), name          # bit for bit
    sd = m.state_dict()
    norm = "model.norm.weight" if family == "llama" else "transformer.ln_f.weight"
    assert np.array_equal(got["output_norm.weight"][1], sd[norm].numpy())
    if family == "gpt2":   # tied: a float lm_head (W4 skips it) needs its own tensor
        assert ("output.weight" in got) == (recipe == W4)
    elif recipe == W8:     # the tiny llama is untied: its quantized lm_head
        assert np.array_equal(got["output.weight"][1], fake_weight(q, "lm_head").numpy())


def test_gguf_asymmetric_4bit_is_q4_1_or_refused_by_its_minima(tmp_path, tmp_path_factory):
    m, q, art = compiled("llama", W4_ASYM, tmp_path_factory)
    try:
        export(art, "gguf", tmp_path / "m.gguf", model=m, vocab=False)
    except ExportError as e:     # -scale * zero_point need not be an fp16 value
        assert "its minima (-scale * zero_point) are not fp16 values" in str(e)
        return
    got = read_back(tmp_path / "m.gguf")
    for name, w in expected("llama", q, m).items():
        assert got[name][0] == "Q4_1" and np.array_equal(got[name][1], w.numpy())


def test_gguf_refuses_a_grid_it_cannot_carry_naming_node_and_nearest_spec(tmp_path,
                                                                          tmp_path_factory):
    m, _, art = compiled("llama", "* -> w8 sym per_channel\n", tmp_path_factory)
    with pytest.raises(ExportError) as e:
        export(art, "gguf", tmp_path / "m.gguf", model=m, vocab=False)
    msg = str(e.value)
    assert msg.startswith("16 weight(s) cannot be written to GGUF exactly (--requantize "
                          "re-rounds them and reports the error):\n")
    assert ("  node block.0.mlp.down (model.layers.0.mlp.down_proj.weight, w8 sym per_channel "
            "minmax): one scale per row; GGUF blocks are 32 columns, each with its own scale; "
            "nearest exportable spec: w8 sym group(size=32)") in msg.splitlines()
    assert ("  node block.0.attn.q (model.layers.0.self_attn.q_proj.weight, w8 sym per_channel "
            "minmax): its scales are not fp16 values (compile with `set export = gguf`, which "
            "rounds them up); nearest exportable spec: w8 sym group(size=32)") in msg.splitlines()
    assert not (tmp_path / "m.gguf").exists()


def test_gguf_requantize_lists_rerounded_tensors_with_their_error(tmp_path, tmp_path_factory):
    m, q, art = compiled("llama", "* -> w8 sym per_channel\n", tmp_path_factory)
    rep = export(art, "gguf", tmp_path / "m.gguf", model=m, vocab=False, requantize=True)
    assert len(rep["requantized"]) == 16
    got = read_back(tmp_path / "m.gguf")
    for r in rep["requantized"]:
        assert r["type"] == "Q8_0" and r["reason"]
        w = expected("llama", q, m).get(r["tensor"])
        if w is not None:   # the error reported is the file's, against qdsl's weight
            err = np.abs(got[r["tensor"]][1] - w.numpy()).max()
            assert err == pytest.approx(r["max_abs_error"])
            assert 0 < err < 0.01 * float(w.abs().max())


def test_set_export_gguf_rounds_weight_scales_to_fp16(tmp_path_factory):
    _, q, _ = compiled("llama", W8, tmp_path_factory)
    m = tiny("llama")
    plain = qdsl.compile(m, "* -> w8 sym group(size=32)\n", calib=tiny_ids(m, 2, 8))
    for name, (scale, _) in q.frozen.weights.items():
        s0 = plain.frozen.weights[name][0]
        assert torch.equal(scale.half().float(), scale)              # fp16 values
        assert (scale >= s0).all()                                   # rounded up, by less
        assert (scale <= torch.maximum(s0 * (1 + 2 ** -10), s0 + 2 ** -24)).all()  # than 1 ulp


def _weight(codes, scale, zp, bits, sym):
    spec = TensorSpec(kind="weight", bits=bits, symmetric=sym, granularity=GroupWise(32))
    w = ((codes.view(codes.shape[0], -1, 32) - zp.unsqueeze(-1)).float()
         * scale.unsqueeze(-1)).reshape(codes.shape)
    return Weight("w", w, "n", spec, codes, scale, zp)


def test_q4_0_nibble_order():
    codes = torch.arange(32, dtype=torch.int32).reshape(1, 32) % 15 - 7      # -7..7
    w = _weight(codes, torch.tensor([[0.5]]), torch.zeros(1, 1, dtype=torch.int32), 4, True)
    blocks, reason = encode(w, "Q4_0")
    assert reason is None and blocks.shape == (1, 18)
    assert blocks[0, :2].view(np.float16)[0] == 0.5
    for j in range(16):   # byte j: column j low, column j + 16 high, both stored + 8
        assert blocks[0, 2 + j] == (int(codes[0, j]) + 8) | ((int(codes[0, j + 16]) + 8) << 4)


@given(st.sampled_from([("Q8_0", 8, True), ("Q4_0", 4, True), ("Q4_0", 2, True),
                        ("Q4_1", 4, False)]),
       st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_blocks_dequantize_to_qdsl_values(kind, rows, nb, seed):
    qtype, bits, sym = kind
    g = torch.Generator().manual_seed(seed)
    lo, hi = ((-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if sym else (0, 2 ** bits - 1))
    codes = torch.randint(lo, hi + 1, (rows, nb * 32), generator=g, dtype=torch.int32)
    scale = (torch.rand(rows, nb, generator=g) * 0.1 + 1e-3).half().float()   # fp16 values
    zp = (torch.zeros(rows, nb, dtype=torch.int32) if sym
          else torch.randint(0, 2, (rows, nb), generator=g, dtype=torch.int32) * 8)
    w = _weight(codes, scale, zp, bits, sym)
    blocks, reason = encode(w, qtype)
    assert reason is None
    back = gguf_dequantize(blocks, gguf.GGMLQuantizationType[qtype]).reshape(rows, -1)
    assert np.array_equal(back, w.tensor.numpy())


def test_cli_export_of_the_shipped_gpt2_with_its_tokenizer(tmp_path, capsys):
    """`qdsl compile` + `qdsl export` on stdlib-gpt2: architecture keys and the full
    vocabulary (tokens by id, merges, special ids, pre-tokenizer) as llama.cpp reads them."""
    from transformers import AutoTokenizer

    from qdsl.cli import main
    from qdsl.models import zoo

    recipe = str(Path(__file__).parents[2] / "recipes" / "export" / "gguf_w8_group32.qrec")
    assert main(["compile", recipe, "--model", "stdlib-gpt2", "-o", str(tmp_path / "a")]) == 0
    assert main(["export", str(tmp_path / "a"), "--format", "gguf",
                 "-o", str(tmp_path / "m.gguf")]) == 0
    assert "wrote" in capsys.readouterr().out
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f["general.architecture"] == "gpt2" and f["gpt2.block_count"] == 4
    assert f["gpt2.context_length"] == 256 and f["gpt2.embedding_length"] == 256
    tok = AutoTokenizer.from_pretrained(zoo.resolve_model("stdlib-gpt2").path)
    by_id = {i: t for t, i in tok.get_vocab().items()}
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.tokens"] == [by_id[i] for i in range(len(by_id))]
    assert len(f["tokenizer.ggml.merges"]) > 0
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    types = {t.tensor_type.name for t in r.tensors}
    assert types == {"Q8_0", "F32"}
    assert main(["export", str(tmp_path / "a"), "--format", "gguf",
                 "-o", str(tmp_path / "x.bin")]) == 2
    assert "a GGUF file must end in .gguf" in capsys.readouterr().err


def test_an_int8_lowered_artifact_is_refused_with_what_to_do(tmp_path):
    m = tiny("llama")
    qdsl.compile(m, "* -> w8 sym per_channel\n", lower="int8").save(tmp_path / "a")
    with pytest.raises(ExportError, match=r"the artifact was lowered to 'int8'; export reads "
                                          r"the fake-quant form: compile the recipe without "
                                          r"--lower int8"):
        export(tmp_path / "a", "gguf", tmp_path / "m.gguf", model=m, vocab=False)
