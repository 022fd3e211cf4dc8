"""`set export = gguf | compressed_tensors`: the setting itself, `qdsl check`'s
rule-level errors (exact messages and locations) and `explain`'s per-node verdicts
and located errors on tiny models, before any data; `compile` refuses the same."""

from __future__ import annotations

import pytest

import qdsl
from qdsl.cli import main
from qdsl.compiler import explain
from qdsl.errors import RecipeError
from qdsl.lang import check_file, parse_recipe
from tiny import tiny, tiny_ids


def _check(tmp_path, text: str) -> list[str]:
    p = tmp_path / "r.qrec"
    p.write_text(text)
    return [f"{d.line}:{d.col}: {d.message} | {d.hint}" for d in check_file(p)]


def test_export_setting_values(tmp_path):
    assert parse_recipe("set export = gguf\n* -> w8 sym group(size=32)\n").settings.export == "gguf"
    r = parse_recipe('set export = compressed_tensors\n* -> w8\n')
    assert r.settings.export == "compressed-tensors"
    assert parse_recipe('set export = "compressed-tensors"\n* -> w8\n').settings.export \
        == "compressed-tensors"
    assert _check(tmp_path, "set export = ggfu\n* -> w8\n") == [
        "1:14: `export` must be one of gguf, compressed-tensors, got `ggfu` | did you mean `gguf`?"]


def test_check_reports_every_rule_gguf_cannot_carry(tmp_path):
    got = _check(tmp_path, "set export = gguf\n"
                           "*                -> w8\n"
                           "block.*.res_sum  -> a16\n"
                           "mlp.c_fc         -> w4 sym group(size=64)\n"
                           "lm_head?         -> w16\n"
                           "embed            -> w8 asym group(size=32)\n")
    assert got == [
        "2:1: `set export = gguf`: w8 without a granularity is per_channel, which GGUF's "
        "32-column blocks cannot carry | write w8 sym group(size=32)",
        "3:1: `set export = gguf`: llama.cpp runs activations in float (it rounds a linear's "
        "input to its own 8-bit blocks at run time, not configurable): a16 cannot be exported "
        "to GGUF | drop the activation spec (weight-only), or `set export = compressed_tensors`",
        "4:1: `set export = gguf`: GGUF blocks are 32 input columns with one fp16 scale each: "
        "group(size=64) cannot be exported | group(size=32)",
        "5:1: `set export = gguf`: GGUF carries integer weights as 4- or 8-bit blocks (Q4_0, "
        "Q4_1, Q8_0): w16 cannot be exported | w8 sym group(size=32)",
        "6:1: `set export = gguf`: GGUF has no 8-bit block with a zero point (Q4_1 is 4 bits) "
        "| w8 sym group(size=32)",
    ]
    assert _check(tmp_path, "set export = gguf\n* -> w4 sym group(size=32)\n") == []


def test_check_reports_every_rule_compressed_tensors_cannot_carry(tmp_path):
    got = _check(tmp_path, "set export = compressed_tensors\n"
                           "*               -> w8 sym per_channel\n"
                           "block.*.res_sum -> a16\n"
                           "mlp.c_fc        -> w8 per_group(K=8, permute)\n"
                           "mlp.c_proj      -> w3 group(size=96)\n")
    assert got == [
        "3:1: `set export = compressed-tensors`: compressed-tensors quantizes linear inputs to "
        "8 bits: a16 cannot be exported | a8 sym per_token dynamic",
        "4:1: `set export = compressed-tensors`: per_group(K=8, permute) (PEG) activation "
        "quantization cannot be exported to compressed-tensors | per_token, or no activation spec",
        "5:1: `set export = compressed-tensors`: vLLM's compressed-tensors kernels take 4- or "
        "8-bit integer weights: w3 cannot be exported | w4 or w8",
        "5:1: `set export = compressed-tensors`: vLLM's kernels take weight groups of 32, 64 or "
        "128 columns: group(size=96) cannot be exported | group(size=128) or per_channel",
    ]


def test_explain_gives_each_node_a_verdict_and_located_errors(tmp_path):
    p = tmp_path / "ct.qrec"
    p.write_text("set export = compressed_tensors\n"
                 "*               -> w8 sym per_channel\n"
                 "block.*.ln_1    -> a8 sym per_token dynamic\n"
                 "block.*.res_sum -> a8 sym per_token dynamic\n"
                 "block.*.attn.k  -> w4 sym group(size=32)\n")
    ex = explain(str(p), tiny("llama"))
    rows = {r["name"]: r["export"] for r in ex.rows()}
    assert rows["block.0.attn.q"] == {"format": "compressed-tensors", "ok": True, "problems": []}
    assert rows["block.0.res_sum"]["problems"] == [{
        "tensor": "activation", "attribute": "bits", "hint": "no activation spec for this node",
        "message": "compressed-tensors quantizes only the inputs of quantized linears; this "
                   "residual_add output is not one"}]
    assert not rows["block.1.attn.k"]["ok"]
    errors = [d.format().splitlines()[0] for d in ex.export_errors]
    assert errors == [
        f"{p}:4:1: error: `set export = compressed-tensors`: node block.0.res_sum and 1 more: "
        "compressed-tensors quantizes only the inputs of quantized linears; this residual_add "
        "output is not one",
        f"{p}:5:1: error: `set export = compressed-tensors`: node block.0.attn.k and 1 more: "
        "vLLM fuses attn.q, attn.k, attn.v into one layer; attn.k is w4 sym group(size=32) "
        "minmax, attn.q w8 sym per_channel minmax",
    ]


def test_explain_cli_exits_1_and_compile_refuses_before_calibration(tmp_path, capsys):
    p = tmp_path / "ct.qrec"
    p.write_text("set export = compressed_tensors\n* -> w8 sym per_channel\n"
                 "block.*.res_sum -> a8 sym per_token dynamic\n")
    assert main(["explain", str(p), "--model", "stdlib-gpt2"]) == 1   # the shipped GPT-2 (4 blocks)
    err = capsys.readouterr().err
    assert (f"{p}:3:1: error: `set export = compressed-tensors`: node block.0.res_sum and 3 "
            "more: compressed-tensors quantizes only the inputs of quantized linears") in err
    m = tiny("llama")
    with pytest.raises(RecipeError, match="this residual_add output is not one"):
        qdsl.compile(m, str(p), calib=tiny_ids(m, 2, 8))
