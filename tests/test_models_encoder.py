"""Checkpoints load as the class they declare (issue 13, item 6).

A BERT encoder directory (config.json: ``architectures: ["BertModel"]``) used to load
through AutoModelForCausalLM as ``BertLMHeadModel``: a randomly initialised LM head
was appended and compile failed capturing it with a key/value cache. Now encoders
load through AutoModel and compile as plain graphs; missing weights are an error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoModel, BertConfig, BertModel, BertTokenizer, GPT2Config,
                          GPT2LMHeadModel)

import qdsl
from qdsl.models import zoo as models
from qdsl.cli import main
from qdsl.compiler import explain
from qdsl.errors import ModelError
from qdsl.resources import data_dir

CARD = str(data_dir("recipes") / "card.qrec")          # block.*.res_sum, mlp.c_fc: BERT has both
WEIGHT_ONLY = str(data_dir("recipes") / "int8" / "w8_weight_only.qrec")
CODE = "import os\n\n\ndef f(x):\n    return x + 1\n\n\nclass A:\n    def g(self):\n        return f(2)\n"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QDSL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder")
    enc = root / "enc"
    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(enc)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "def", "return",
                                "class", "import", "x", "f", "g", "a", "self", "os"]
                               + [f"w{i}" for i in range(49)]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(enc)
    code = root / "code"
    code.mkdir()
    for i in range(3):
        (code / f"m{i}.py").write_text(CODE * (i + 1))
    assert json.loads((enc / "config.json").read_text())["architectures"] == ["BertModel"]
    return root


def _names(rows) -> set[str]:
    return {r["name"] for r in rows} | {r["module"] for r in rows}


def test_architecture_is_read_from_the_config(work, tmp_path):
    arch = models.checkpoint_architecture(work / "enc")
    assert (arch.name, arch.causal) == ("BertModel", False)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1,
                               n_head=2)).save_pretrained(tmp_path / "g")
    assert models.checkpoint_architecture(tmp_path / "g").causal
    cfg = tmp_path / "c" / "config.json"
    cfg.parent.mkdir()
    for text, message in [('{"architectures": ["BertForMaskedLM"], "model_type": "bert"}',
                           "declares architecture BertForMaskedLM"),
                          ('{"architectures": "BertModel"}', "list of class names"),
                          ("[]", "not a JSON object"), ("{", "not a readable JSON config")]:
        cfg.write_text(text)
        with pytest.raises(ModelError, match=message):
            models.checkpoint_architecture(cfg.parent)


def test_encoder_loads_without_a_head(work):
    model, tok = models.load_model(work / "enc")
    assert type(model).__name__ == "BertModel" and tok is not None
    assert model.get_output_embeddings() is None and not model.training
    assert not any("lm_head" in n or n.startswith("cls.") for n, _ in model.named_parameters())
    with pytest.raises(ModelError, match=r"is an encoder / base model \(BertModel\).*"
                                         r"eval, bench and HumanEval need a causal LM"):
        models.load_model(work / "enc", require_causal=True)


def test_explain_encoder_directory(work, capsys):
    ex = explain(CARD, str(work / "enc"))
    names = _names(ex.rows())
    assert ex.captured.mode == "plain" and ex.named.blocks == 2
    assert not any("lm_head" in n or "ln_f" in n or n.startswith("cls") for n in names), names
    assert ex.plan["block.1.mlp.c_fc"].weight.bits == 8
    rc = main(["explain", CARD, "--model", str(work / "enc"), "--format", "json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    rows = json.loads(out.out)
    assert "block.0.res_sum" in {r["name"] for r in rows}
    assert not any("lm_head" in n or "ln_f" in n for n in _names(rows))


def test_compile_encoder_directory_cli_and_api(work, tmp_path, capsys):
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    ref = AutoModel.from_pretrained(work / "enc").eval()(ids).last_hidden_state
    out = tmp_path / "fake"
    rc = main(["compile", CARD, "--model", str(work / "enc"), "--calib", str(work / "code"),
               "--samples", "2", "--seq-len", "16", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    q = qdsl.load(out)
    assert q.mode == "plain" and q(ids).shape == ref.shape
    assert torch.isfinite(q(ids)).all() and (q(ids) - ref).abs().max() < 0.5, (q(ids) - ref).abs().max()
    # self-contained int8: rebuilt from model/config.json as the encoder it declares
    rc = main(["compile", WEIGHT_ONLY, "--model", str(work / "enc"), "--lower", "int8",
               "-o", str(tmp_path / "int8")])
    assert rc == 0, capsys.readouterr().err
    q8 = qdsl.load(tmp_path / "int8")
    assert q8.mode == "plain" and (q8(ids) - ref).abs().max() < 0.1
    # the Python API with a directory name, and with the same model as an nn.Module
    api = qdsl.compile(str(work / "enc"), CARD, calib=torch.randint(1, 64, (2, 16)),
                       progress=False)
    module = qdsl.compile(BertModel.from_pretrained(work / "enc"), CARD,
                          calib=torch.randint(1, 64, (2, 16)), progress=False)
    assert api.mode == module.mode == "plain"
    assert api.plan.graph_hash == module.plan.graph_hash


def _last_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert lines and "Traceback" not in err, err
    return lines[-1]


def test_eval_and_bench_on_an_encoder_are_clear_errors(work, tmp_path, capsys):
    enc = str(work / "enc")
    for argv in (["eval", enc, "--bench", str(work / "code"), "--n", "2", "--no-progress"],
                 ["eval", enc, "--bench", str(work / "code"), "--n", "2", "--humaneval", "1",
                  "--no-progress"],
                 ["bench", enc]):
        rc = main(argv)
        line = _last_line(capsys.readouterr().err)
        assert rc == 2 and line.startswith(f"error: {enc} is an encoder"), (argv, line)
        assert "need a causal LM" in line and "explain and compile work" in line


def test_eval_on_an_encoder_artifact_is_a_clear_error(work, tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["compile", WEIGHT_ONLY, "--model", str(work / "enc"), "-o", str(out)]) == 0
    capsys.readouterr()
    rc = main(["eval", str(out), "--bench", str(work / "code"), "--n", "2", "--no-progress"])
    line = _last_line(capsys.readouterr().err)
    assert rc == 2 and "is an encoder" in line and "need a causal LM" in line, line


def test_missing_weights_are_an_error_not_random(tmp_path, capsys):
    d = tmp_path / "g"
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                     tie_word_embeddings=False)
    GPT2LMHeadModel(cfg).save_pretrained(d)
    state = load_file(d / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != "lm_head.weight"},
              d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"GPT2LMHeadModel.*1 weights at random.*lm_head\.weight"):
        models.load_model(d, tokenizer=False)
    # a shape that does not fit is refused the same way (not reinitialised)
    save_file({**state, "transformer.h.0.mlp.c_fc.weight": torch.zeros(3, 3)},
              d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"random.*transformer\.h\.0\.mlp\.c_fc\.weight"):
        models.load_model(d, tokenizer=False)
    rc = main(["explain", CARD, "--model", str(d)])
    line = _last_line(capsys.readouterr().err)
    assert rc == 2 and "refusing to quantize untrained weights" in line


def test_encoder_without_architectures_is_refused_with_a_hint(work, tmp_path):
    import shutil

    d = tmp_path / "old"
    shutil.copytree(work / "enc", d)
    config = json.loads((d / "config.json").read_text())
    del config["architectures"]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"cls\.predictions.*declares no 'architectures'"):
        models.load_model(d)


def test_shipped_model_loads_strictly():
    model, tok = models.load_model("stdlib-gpt2")
    assert type(model).__name__ == "GPT2LMHeadModel" and tok is not None
