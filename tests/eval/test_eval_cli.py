"""``qdsl eval`` on a tiny local GPT-2 with its own tokenizer (no downloads)."""

import json
import sys

import pytest
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from qdsl.cli import main

CODE = "def f(x):\n    return x + 1\n\n\nclass A:\n    def g(self):\n        return f(2)\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    code = root / "code"
    code.mkdir()
    for i in range(3):
        (code / f"m{i}.py").write_text(CODE * (i + 1))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([CODE] * 10, vocab_size=300, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2)
    GPT2LMHeadModel(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root


def test_eval_writes_json_with_baseline_deltas(tiny, capsys):
    out = tiny / "res.json"
    rc = main(["eval", str(tiny / "model"), "--bench", str(tiny / "code"), "--n", "3",
               "--baseline", str(tiny / "model"), "--ppl-windows", "2", "--max-new-tokens", "4",
               "--save-bench", str(tiny / "b.jsonl"), "--json", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["n"] == 3 and res["target"]["max_positions"] == 64
    assert res["delta"]["em"] == 0 and res["delta"]["es"] == 0      # same model twice
    assert len(res["target"]["samples"]) == 3
    assert "EM" in capsys.readouterr().out
    # the same model twice: every paired difference is 0 and within its margin
    paired = {m["metric"]: m for m in res["paired"]["metrics"]}
    assert paired["es"]["diff"]["est"] == 0 and paired["es"]["margin_verdict"] == "within"
    assert paired["ppl"]["ratio"]["est"] == pytest.approx(1.0)
    assert main(["compare", str(out)]) == 0
    assert "not distinguishable" in capsys.readouterr().out
    rc = main(["eval", str(tiny / "model"), "--bench", str(tiny / "b.jsonl"), "--ppl-windows", "0",
               "--max-new-tokens", "4", "--json", str(tiny / "res2.json"), "--no-progress"])
    again = json.loads((tiny / "res2.json").read_text())
    assert [s["pred"] for s in again["target"]["samples"]] == \
        [s["pred"] for s in res["target"]["samples"]]


def test_artifact_without_compiler_is_a_clear_error(tiny, monkeypatch, capsys):
    art = tiny / "art"
    art.mkdir(exist_ok=True)
    (art / "qdsl_artifact.json").write_text(json.dumps({"model": {"id": str(tiny / "model"), "hash": "x"}}))
    for name in ("qdsl.artifact.store", "qdsl.compiler.loading"):   # a build without them
        monkeypatch.setitem(sys.modules, name, None)                # import fails
    assert main(["eval", str(art), "--bench", str(tiny / "code"), "--n", "1"]) == 2
    assert "compiled artifacts need qdsl compile" in capsys.readouterr().err


def test_bad_bench_is_a_clear_error(tiny, capsys):
    assert main(["eval", str(tiny / "model"), "--bench", str(tiny / "nope")]) == 2
    assert "not 'stdlib'" in capsys.readouterr().err
