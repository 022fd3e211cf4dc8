"""qdsl explain on the four families: the card's lines match what they should."""

from __future__ import annotations

import json

import pytest

from qdsl.cli import main
from qdsl.compiler import explain
from qdsl.errors import PlanError
from qdsl.resources import data_dir
from tiny import tiny

CARD = data_dir("recipes") / "card.qrec"
# the MLP's first linear(s) per family: the card's `mlp.c_fc` (gated MLPs: alias of up/gate)
FIRST_MLP = {"gpt2": ["mlp.c_fc"], "codegen": ["mlp.c_fc"], "llama": ["mlp.gate", "mlp.up"],
             "bert": ["mlp.c_fc"]}


@pytest.mark.parametrize("family", ["gpt2", "codegen", "llama", "bert"])
def test_card_lines_on_each_family(family):
    ex = explain(CARD, tiny(family))
    rows = {r["name"]: r for r in ex.rows()}
    blocks = ex.named.blocks
    assert blocks == 2
    for b in range(blocks):
        assert ex.plan[f"block.{b}.res_sum"].activation.bits == 16
        for part in FIRST_MLP[family]:
            e = ex.plan[f"block.{b}.{part}"]
            assert e.weight.bits == 8
            # per_group is recorded for the activation; alone the card gives it no bits
            assert "granularity" in e.decided_by["activation"]
            assert rows[f"block.{b}.{part}"]["rule"].startswith(str(CARD))
    # nothing else is touched
    touched = {e.name for e in ex.plan.entries if e.decided_by}
    expect = {f"block.{b}.{p}" for b in range(blocks) for p in ["res_sum"] + FIRST_MLP[family]}
    assert touched == expect


def test_json_rows_have_the_documented_keys():
    ex = explain("* -> w8a8\nlm_head -> skip\n", tiny("gpt2"))
    for r in ex.rows():
        assert {"name", "role", "module", "weight", "activation", "rule"} <= set(r)
    assert json.loads(json.dumps(ex.rows()))


def test_summary_reports_storage_shrink():
    ex = explain("* -> w8a8\n", tiny("llama"))
    s = ex.summary()
    assert "8-bit" in s and "parameter storage" in s
    from qdsl.compiler.render import storage

    st = storage(ex.captured.gm, ex.named, ex.plan)
    assert 0.25 < st.after / st.before < 0.3  # 8-bit + per-channel scales; norms stay fp32


def test_a_tied_table_is_counted_once_per_stored_copy():
    """A float embedding and an 8-bit lm_head sharing one tensor are two stored copies
    (the int8 artifact holds the float table and lm_head's codes); both at the same spec
    share one int8 table."""
    from qdsl.compiler.render import storage

    model = tiny("llama", tie_word_embeddings=True)
    after = {}
    for key, text in {"float_embed": "* -> w8 sym per_channel\nembed -> w32\n",
                      "both_int8": "* -> w8 sym per_channel\n"}.items():
        ex = explain(text, model)
        after[key] = storage(ex.captured.gm, ex.named, ex.plan).after
    vocab, hidden = model.lm_head.weight.shape
    assert after["float_embed"] - after["both_int8"] == vocab * hidden * 4


def test_the_body_leaves_out_the_embeddings_and_lm_head():
    """Storage's body is every parameter but the embedding tables and lm_head: with those
    kept float, the body's ratio is the blocks' own (near a nominal 4x at 8 bits), and
    the whole model's is lower by the float tables."""
    from qdsl.compiler.render import storage

    model = tiny("gpt2")
    ex = explain("* -> w8 sym per_channel\nembed -> w32\nembed.pos -> w32\n"
                 "lm_head -> skip\n", model)
    st = storage(ex.captured.gm, ex.named, ex.plan)
    tables = {id(model.transformer.wte.weight): model.transformer.wte.weight,
              id(model.transformer.wpe.weight): model.transformer.wpe.weight,
              id(model.lm_head.weight): model.lm_head.weight}
    outside = sum(t.numel() * 4 for t in tables.values())
    assert st.before - st.body_before == outside          # lm_head tied to wte: once
    assert st.after - st.body_after == outside            # kept float
    assert 3.0 < st.body_compression and st.compression < st.body_compression
    assert "without the embeddings and lm_head" in ex.summary()
    both = storage(*(lambda e: (e.captured.gm, e.named, e.plan))(
        explain("* -> w8 sym per_channel\n", model)))
    assert both.body_after == st.body_after and both.after < st.after


def test_graph_picture(tmp_path):
    ex = explain(CARD, tiny("llama"))
    out = tmp_path / "block.png"
    ex.draw(str(out), block=1)
    assert out.stat().st_size > 10_000


def test_unknown_part_is_a_located_error():
    with pytest.raises(PlanError) as e:
        explain("block.*.res_summ -> a16\n", tiny("gpt2"))
    d = e.value.diagnostics[0]
    assert (d.line, d.col) == (1, 1) and "res_sum" in d.hint


def test_cli_explain_on_a_saved_model(tmp_path, capsys):
    model_dir = tmp_path / "m"
    tiny("gpt2").save_pretrained(model_dir)
    assert main(["explain", str(CARD), "--model", str(model_dir), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert any(r["name"] == "block.1.res_sum" and r["activation"].startswith("a16") for r in rows)
    bad = tmp_path / "bad.qrec"
    bad.write_text("attn.probs -> w8\n")
    assert main(["explain", str(bad), "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1:1: error: weight options on `block.0.attn.probs`" in err
    assert "Traceback" not in err


def test_explain_lower_int8_says_which_kernels_run_here(tmp_path, monkeypatch):
    """`--lower int8` adds the kernel per operation and shape class on this CPU,
    naming 'dequantize + float32 GEMM' where that is the choice; fake lowering: none."""
    monkeypatch.setenv("QDSL_KERNEL_CACHE", str(tmp_path))
    recipe = "* -> w8 a.dynamic per_token\n"
    assert explain(recipe, tiny("gpt2"), lower="fake").kernel_lines() == []
    lines = explain(recipe, tiny("gpt2"), lower="int8").kernel_lines()
    assert lines[0].startswith("CPU: ")
    keys = {line.split(":")[0] for line in lines[1:] if not line.startswith("qdsl's C++")}
    ops = ("w8a8", "w8", "w4", "w4a8", "w1", "w1a8", "embedding_int8")
    assert keys == {f"{op}/{c}" for op in ops for c in ("decode", "prefill")}
    assert all("float32 GEMM" in line for line in lines if ": float_gemm" in line)
