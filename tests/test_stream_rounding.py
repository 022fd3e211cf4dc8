"""compile --stream with GPTQ / AWQ: each stage's weights rounded from that stage's
input statistics, the same artifact as the in-memory compile, one stage's statistics
alive at a time."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from qdsl.compiler import stream
from qdsl.compiler.build import compile
from qdsl.compiler.stream import compile_stream
from qdsl.errors import RecipeError
from qdsl.models.calib import CalibrationError
from qdsl.quant.hessian import InputStats

from test_stream import _checkpoint, _same_artifact

GPTQ = "* -> w4 sym group(size=16) gptq(act_order)\nembed -> rtn\nembed.pos? -> rtn\n"
AWQ = "* -> w4 sym group(size=16) awq(clip)\nembed -> rtn\nembed.pos? -> rtn\n"
# GPTQ on the linears, static 8-bit activations observed in the same stage run
GPTQ_STATIC = ("* -> w4 sym group(size=16) gptq\nembed -> rtn\nembed.pos? -> rtn\n"
               "type:Linear -> a8 sym per_tensor minmax static\n")


def _kept(art) -> tuple[list[str], list[str]]:
    """(the stored GPTQ / AWQ codes, AWQ's input scales) of an artifact."""
    with safe_open(str(art / "quant_params.safetensors"), "pt") as f:
        keys = list(f.keys())
    return ([k for k in keys if k.endswith(".codes")], [k for k in keys if k.endswith(".in_scale")])


@pytest.mark.parametrize("family,recipe", [
    ("llama", GPTQ), ("llama", AWQ), ("gpt2", GPTQ), ("gpt2", AWQ), ("llama", GPTQ_STATIC)],
    ids=["llama-gptq", "llama-awq", "gpt2-gptq", "gpt2-awq", "llama-gptq-a8static"])
def test_stream_rounding_is_byte_identical(tmp_path, family, recipe):
    d, ids = _checkpoint(tmp_path, family)
    compile(d, recipe, calib=ids, progress=False).save(tmp_path / "mem")
    qm = compile_stream(d, recipe, tmp_path / "stream", calib=ids, progress=False)
    _same_artifact(tmp_path / "mem", tmp_path / "stream")
    codes, in_scales = _kept(tmp_path / "stream")
    # every linear's GPTQ / AWQ codes are stored (not rounded to nearest): lm_head included
    linears = [n.name for n in qm.named.nodes if qm.plan[n.name].weight is not None
               and qm.plan[n.name].weight.rounding is not None]
    assert len(codes) == len(linears) > 0
    assert any("lm_head" in c or "head" in c for c in codes)
    assert len(in_scales) == (len(linears) if "awq" in recipe else 0)
    assert not any(k.startswith("qdsl_stats__") for k, _ in qm.gm.named_modules())
    assert all(p.is_meta for p in qm.gm.parameters())


def test_stream_holds_one_stage_of_statistics(tmp_path, monkeypatch):
    """When a stage's weights are rounded, the only recorders holding statistics are
    that stage's (the earlier stages' are freed), and none is left at the end."""
    d, ids = _checkpoint(tmp_path, "llama")
    orig = stream.round_sites
    calls, seen = [], []

    def spy(gm, sites, plan, stats, users, **kw):
        mods = {id(m): m for m in stats.values()}
        live = {i for i, m in mods.items() if m.xtx.numel() > 0}
        mine = {id(stats[n.name]) for n in sites}
        if sites:
            calls.append((len(sites), len(live)))
            assert live == mine, "statistics of another stage are alive"
        else:
            assert live == set()
        out = orig(gm, sites, plan, stats, users, **kw)
        assert all(mods[i].xtx.numel() == 0 for i in mine), "a stage's statistics stayed"
        seen.append(stats)
        return out

    monkeypatch.setattr(stream, "round_sites", spy)
    compile_stream(d, GPTQ, tmp_path / "out", calib=ids, progress=False)
    blocks = 2   # tiny llama
    # each block: q / k / v share one recorder, o, gate / up share one, down: 4 of 7;
    # the head: lm_head's one
    assert calls == [(7, 4)] * blocks + [(1, 1)]
    mods = list(seen[-1].values())
    assert mods and all(isinstance(m, InputStats) and m.xtx.numel() == 0 for m in mods)


def test_stream_rounding_needs_data(tmp_path):
    """A weight-only GPTQ recipe (no observers) still reads calibration data."""
    d, _ = _checkpoint(tmp_path, "llama")
    with pytest.raises(CalibrationError, match="rounds .* weights with GPTQ / AWQ"):
        compile_stream(d, GPTQ, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_stream_still_refuses_transforms_with_rounding(tmp_path):
    d, ids = _checkpoint(tmp_path, "llama")
    text = "smooth type:Linear? alpha=0.5\n" + GPTQ
    with pytest.raises(RecipeError) as e:
        compile_stream(d, text, tmp_path / "o", calib=ids, progress=False)
    assert "`smooth` is not supported with --stream" in str(e.value)
    # one per smoothed group, all at the smooth statement; none about the rounding
    assert {(d.line, d.message.split()[0]) for d in e.value.diagnostics} == {(1, "`smooth`")}
