"""compile --stream: the same artifact as the in-memory compile, one block in memory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from qdsl.cli.app import main
from qdsl.compiler import stream
from qdsl.compiler.build import compile
from qdsl.compiler.stream import compile_stream
from qdsl.errors import ModelError, RecipeError

from tiny import tiny, tiny_ids

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "recipes" / "wei" / "t4_static_per_column.qrec"       # w8 minmax, a8 mse static
WEIGHT_ONLY = ROOT / "recipes" / "int8" / "w8_weight_only.qrec"
FILES = ("quant_params.safetensors", "plan.json", "recipe.qrec")


def _checkpoint(tmp_path: Path, family: str = "llama") -> tuple[Path, torch.Tensor]:
    """A tiny model saved as a safetensors checkpoint (with a tokenizer, which load_model
    reads; the windows are given as ids) and its calibration windows."""
    m = tiny(family)
    d = tmp_path / family
    m.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "models" / "stdlib-gpt2" / f, d)
    return d, tiny_ids(m, 3, 12)


def _same_artifact(a: Path, b: Path) -> None:
    for f in FILES:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    ma, mb = (json.loads((p / "qdsl_artifact.json").read_text()) for p in (a, b))
    ma.pop("created"), mb.pop("created")
    assert ma == mb


@pytest.mark.parametrize("family,recipe", [
    ("llama", STATIC), ("gpt2", STATIC), ("gpt2", WEIGHT_ONLY),
    pytest.param("codegen", STATIC, marks=pytest.mark.slow)])
def test_stream_is_byte_identical(tmp_path, family, recipe):
    d, ids = _checkpoint(tmp_path, family)
    compile(d, recipe, calib=ids, progress=False).save(tmp_path / "mem")
    qm = compile_stream(d, recipe, tmp_path / "stream", calib=ids, progress=False)
    _same_artifact(tmp_path / "mem", tmp_path / "stream")
    # what was returned holds no float weights: every model parameter is on meta
    assert all(p.is_meta for p in qm.gm.parameters())


def test_stream_holds_one_stage_at_a_time(tmp_path, monkeypatch):
    """At most one stage's parameters are real at any time; each is freed after it."""
    d, ids = _checkpoint(tmp_path, "llama")
    real, peak = set(), [0]
    orig = stream.set_tensor

    def spy(gm, target, value):
        (real.discard if value.is_meta else real.add)(target)
        peak[0] = max(peak[0], len(real))
        orig(gm, target, value)

    monkeypatch.setattr(stream, "set_tensor", spy)
    compile_stream(d, STATIC, tmp_path / "out", calib=ids, progress=False)
    per_block = 9   # a llama block: q, k, v, o, gate, up, down, two norms
    assert 0 < peak[0] <= per_block
    assert real == set()


@pytest.mark.slow
def test_stream_plain_encoder(tmp_path):
    """An encoder (plain graph, batches of windows) streams to the same artifact."""
    m = tiny("bert")
    d = tmp_path / "bert"
    m.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "models" / "stdlib-gpt2" / f, d)
    ids = tiny_ids(m, 5, 10)   # two batches of calib.batch_size 3
    recipe = ("set calib.batch_size = 3\n* -> w8 sym per_channel minmax\n"
              "type:Linear -> a8 sym per_tensor minmax static\n")
    compile(d, recipe, calib=ids, progress=False).save(tmp_path / "mem")
    compile_stream(d, recipe, tmp_path / "stream", calib=ids, progress=False)
    _same_artifact(tmp_path / "mem", tmp_path / "stream")


def test_stream_refuses_whole_model_transforms(tmp_path):
    d, ids = _checkpoint(tmp_path, "llama")
    text = "smooth type:Linear? alpha=0.5\n* -> w8 sym per_channel\n"
    with pytest.raises(RecipeError) as e:
        compile_stream(d, text, tmp_path / "o", calib=ids, progress=False)
    assert "`smooth` is not supported with --stream" in str(e.value)
    assert e.value.diagnostics[0].line == 1
    with pytest.raises(ModelError, match="--lower int8 is not supported with --stream"):
        compile_stream(d, STATIC, tmp_path / "o", calib=ids, lower="int8", progress=False)
    assert not (tmp_path / "o").exists()


def test_cli_stream(tmp_path, capsys):
    d, _ = _checkpoint(tmp_path, "gpt2")
    out = tmp_path / "art"
    rc = main(["compile", str(WEIGHT_ONLY), "--model", str(d), "--stream", "-o", str(out)])
    assert rc == 0 and (out / "quant_params.safetensors").is_file()
    assert "streamed" in capsys.readouterr().out
    rc = main(["compile", str(STATIC), "--model", str(d), "--stream", "--lower", "int8",
               "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc != 0 and "not supported with --stream" in err and "Traceback" not in err
