"""SmoothQuant (`smooth SELECTOR alpha=A`): plan groups and located errors, the float
model unchanged by the fold, the scales' formula, int8 lowering and artifacts."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from tiny import tiny, tiny_ids

import qdsl.compiler as C
from qdsl.errors import PlanError
from qdsl.lang import parse_recipe
from qdsl.quant.channelstats import smooth_scales
from qdsl.runtime import Int8StaticLinear

W8A8 = "* -> w8 sym per_channel\ntype:Linear.input -> a8 sym per_tensor static\n"


def _outliers(model):
    """Give a few hidden channels large norm scales, as trained LLMs have (random tiny
    models have none, and smoothing would have nothing to migrate)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p[..., :3] *= 30.0
    return model


def compile_(family, recipe, lower="fake", model=None):
    m = model if model is not None else _outliers(tiny(family))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = C.compile(m, recipe, calib=tiny_ids(m, 4, 16), lower=lower, max_cache_len=32,
                      progress=False)
    return m, q


def explain(text, family="llama"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return C.explain(parse_recipe(text, "t.qrec"), tiny(family))


def test_groups_share_one_scale_per_tensor():
    plan = explain("smooth type:Linear? alpha=0.7\n").plan
    groups = {t.producer: (t.fold_kind, t.fold, t.consumers, t.alpha) for t in plan.transforms}
    assert groups["block.0.ln_1"] == ("norm", "block.0.ln_1",
                                      ("block.0.attn.q", "block.0.attn.k", "block.0.attn.v"), 0.7)
    assert groups["block.0.ln_2"][2] == ("block.0.mlp.gate", "block.0.mlp.up")
    assert groups["block.0.mlp.mul"][:2] == ("linear", "block.0.mlp.up")  # act(gate) * up
    assert "block.0.attn.context" not in groups                          # `?`: left out
    assert len(plan.to_json()["transforms"]) == len(plan.transforms)


@pytest.mark.parametrize("text, message", [
    ("smooth attn.out\n", "smooth `attn.out`: cannot smooth `block.0.attn.out`: "
     "`block.0.attn.context` is a attn_context: no per-channel weight to fold the scale into "
     "(SmoothQuant folds into a norm or a linear) (and 1 more)"),
    ("smooth attn.q\n", "smooth `attn.q`: cannot smooth `block.0.attn.q`: its input (the output "
     "of `block.0.ln_1`) is also read by `block.0.attn.k`, `block.0.attn.v`, which this "
     "statement does not select: one scale is shared by every reader (and 1 more)"),
    ("smooth op:softmax\n", "smooth `op:softmax`: cannot smooth no linear matches `op:softmax`"),
])
def test_structures_that_do_not_fit_are_located_errors(text, message):
    with pytest.raises(PlanError) as e:
        explain("* -> w8\n" + text)
    (d,) = e.value.diagnostics
    assert (d.file, d.line, d.col, d.message) == ("t.qrec", 2, 1, message)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_fold_leaves_the_float_model_unchanged(family):
    model = _outliers(tiny(family))
    ids = tiny_ids(model, 2, 12, seed=7)
    with torch.no_grad():
        ref = model(ids).logits
    _, q = compile_(family, "smooth type:Linear? alpha=0.5\n", model=model)
    assert q.plan.transforms and q.frozen.smooth
    assert any((s - 1).abs().max() > 0.5 for s in q.frozen.smooth.values())  # it moved
    out = q(ids)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)   # the source model is not written


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 64), st.floats(0.0, 1.0), st.integers(0, 2 ** 16))
def test_scales_balance_activation_and_weight_ranges(c, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(c, generator=g) * 100 + 1e-3
    w = torch.rand(c, generator=g) + 1e-3
    s = smooth_scales(x, w, alpha)
    assert torch.allclose(s, x ** alpha / w ** (1 - alpha), rtol=1e-5)
    # after migration max|X/s| = max|X|^(1-a) max|W|^(1-a) = max|W*s|^(1-a)/... : equal at a=.5
    if abs(alpha - 0.5) < 1e-9:
        assert torch.allclose(x / s, w * s, rtol=1e-4)
    assert torch.equal(smooth_scales(torch.zeros(c), w, alpha), torch.ones(c))


def test_int8_lowering_and_artifact_round_trip(tmp_path):
    recipe = W8A8 + "smooth type:Linear? alpha=0.5\n"
    model, q = compile_("llama", recipe, lower="int8")
    kinds = {n.meta.get("qdsl"): type(q.gm.get_submodule(n.target))
             for n in q.gm.graph.nodes if n.op == "call_module" and "qdsl_int8__" in n.target}
    assert kinds["block.0.mlp.down"] is Int8StaticLinear and kinds["lm_head"] is Int8StaticLinear
    ids = tiny_ids(model, 2, 12, seed=7)
    a = q(ids)
    q.save(tmp_path / "int8")
    assert torch.equal(C.load(tmp_path / "int8")(ids), a)
    _, fake = compile_("llama", recipe, lower="fake", model=model)
    fake.save(tmp_path / "fake")
    assert torch.equal(C.load(tmp_path / "fake", model)(ids), fake(ids))
    b = fake(ids)
    assert (a - b).abs().max() <= 0.02 * b.abs().max()


def test_smoothing_reduces_the_static_w8a8_error_with_outliers():
    model = _outliers(tiny("llama"))
    ids = tiny_ids(model, 2, 12, seed=7)
    with torch.no_grad():
        ref = model(ids).logits
    errs = {}
    for name, extra in (("plain", ""), ("smooth", "smooth type:Linear? alpha=0.5\n")):
        _, q = compile_("llama", W8A8 + extra, model=model)
        errs[name] = (q(ids) - ref).pow(2).mean().item()
    assert errs["smooth"] < errs["plain"], errs


def test_explain_summary_lists_the_planned_transforms():
    ex = explain("smooth type:Linear? alpha=0.5\nrotate\n")
    lines = [ln for ln in ex.summary().splitlines() if ln.startswith("transform ")]
    assert lines[0] == ("transform smooth (t.qrec:1:1, alpha 0.5): block.0.ln_1 -> "
                        "block.0.attn.q, block.0.attn.k, block.0.attn.v (folded into norm "
                        "block.0.ln_1)")
    assert lines[-1].startswith("transform rotate (t.qrec:2:1): residual stream")
