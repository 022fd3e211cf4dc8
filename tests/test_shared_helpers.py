"""The helpers that live once (issue 14): selector text, atomic paths, Conv1D, op tables."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from qdsl.config.recipe import Selector, selector_text
from qdsl.lang.parser import parse_document
from qdsl.lang.syntax import RuleLine


@pytest.mark.parametrize("kind, pattern, optional, text", [
    ("glob", "block.*.mlp.c_fc", False, "block.*.mlp.c_fc"),
    ("glob", "lm_head", True, "lm_head?"),
    ("op", "softmax", False, "op:softmax"),
    ("type", "Linear", True, "type:Linear?"),
    ("module", "transformer.h.*.attn", False, "module:transformer.h.*.attn"),
    ("re", r"block\.[0-3]\.mlp\..*", True, r're:"block\.[0-3]\.mlp\..*"?'),
])
def test_selector_text_parses_back(kind, pattern, optional, text):
    assert selector_text(kind, pattern, optional) == text
    assert Selector(kind, pattern, optional).text() == text
    doc, diags = parse_document(f"{text} -> w8\n")
    assert not diags
    (line,) = [ln for ln in doc.lines if isinstance(ln, RuleLine)]
    sel = line.selector
    assert (sel.kind, sel.pattern, sel.optional) == (kind, pattern, optional)
    assert sel.text() == text


# ---------------------------------------------------------------- atomic_path

def test_atomic_path_replaces_on_success_and_keeps_the_mode(tmp_path):
    from qdsl.atomic import atomic_path, umasked

    target = tmp_path / "sub" / "plot.png"
    with atomic_path(target, suffix=".tmp.png") as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".tmp.png")
        tmp.write_bytes(b"one")
    assert target.read_bytes() == b"one"
    assert target.stat().st_mode & 0o777 == umasked(0o666)
    target.chmod(0o640)
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"two")
    assert target.read_bytes() == b"two" and target.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in target.parent.iterdir()) == ["plot.png"]


def test_atomic_path_leaves_the_target_alone_on_error(tmp_path):
    from qdsl.atomic import atomic_path

    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_write_text_atomic_new_file_has_the_umask_mode(tmp_path, umask):
    """A new file gets what open() would give it (0o666 less the umask), not mkstemp's
    0600; an existing file keeps its own mode."""
    from qdsl.atomic import write_text_atomic

    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "new.txt", "x\n")
        with open(tmp_path / "by_open.txt", "w") as f:
            f.write("x\n")
        (tmp_path / "kept.txt").write_text("old")
        os.chmod(tmp_path / "kept.txt", 0o640)
        write_text_atomic(tmp_path / "kept.txt", "new")
    finally:
        os.umask(old)
    mode = (tmp_path / "new.txt").stat().st_mode & 0o777
    assert mode == (tmp_path / "by_open.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "kept.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "kept.txt").read_text() == "new"


def test_write_json_atomic_writes_nan_as_null(tmp_path):
    from qdsl.atomic import write_json_atomic

    write_json_atomic(tmp_path / "r.json", {"ppl": float("nan"), "xs": (1.0, float("inf"))})
    want = '{\n "ppl": null,\n "xs": [\n  1.0,\n  null\n ]\n}\n'
    assert (tmp_path / "r.json").read_text() == want


# ---------------------------------------------------------------- Conv1D

def test_conv1d_helpers_match_an_nn_linear():
    from transformers.pytorch_utils import Conv1D

    from qdsl.runtime.conv1d import conv1d_to_linear, is_conv1d, linear_weight, oriented

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(6, 4), nn.Linear(6, 3))
    x = torch.randn(2, 4)
    want = model(x)
    assert is_conv1d(model[0]) and not is_conv1d(model[1])
    assert linear_weight(model[0]).shape == (6, 4)          # [out, in]
    assert linear_weight(model[1]) is model[1].weight
    assert linear_weight(nn.ReLU()) is None
    assert torch.equal(oriented(model[0].weight, "in_out"), model[0].weight.t())
    assert oriented(model[1].weight, "out_in") is model[1].weight
    conv1d_to_linear(model)
    assert isinstance(model[0], nn.Linear)
    torch.testing.assert_close(model(x), want)


# ---------------------------------------------------------------- op tables

def test_the_aten_rows_are_the_weighted_ops():
    from qdsl.graph.ops import WEIGHTED_ATEN_OPS, WEIGHTED_OPS
    from qdsl.passes.lower_int8 import OPS

    assert OPS is WEIGHTED_ATEN_OPS
    assert WEIGHTED_ATEN_OPS == {"aten.linear.default": (0, 1, 2, False),
                                 "aten.addmm.default": (1, 2, 0, True),
                                 "aten.embedding.default": (1, 0, None, False)}
    assert {k.split(".")[1] for k in WEIGHTED_ATEN_OPS} == set(WEIGHTED_OPS)


def test_op_names():
    from torch import fx

    from qdsl.graph.ops import aten_name, opname

    g = fx.Graph()
    x = g.placeholder("x")
    v = g.call_function(torch.ops.aten.view.default, (x, [-1]))
    assert (opname(v), aten_name(v)) == ("view", "aten.view.default")
    assert (opname(x), aten_name(x)) == ("", "")
    assert aten_name(3) == ""


# ---------------------------------------------------------------- graph attributes

def test_owner_and_param_of_a_dotted_target():
    from qdsl.graph.attrs import owner, param

    model = nn.Sequential(nn.Linear(2, 3))
    model.register_buffer("scale", torch.ones(1))
    assert owner(model, "0.weight") == (model[0], "weight")
    assert owner(model, "scale") == (model, "scale")
    assert param(model, "0.weight") is model[0].weight
    assert param(model, "scale") is model.scale
