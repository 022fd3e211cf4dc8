"""The pass runner: logging, requires, check=True; the compile pipelines under check."""

from __future__ import annotations

import logging

import pytest
import torch

from qdsl.compiler import build as C
from qdsl.errors import GraphError
from qdsl.graph.capture import capture
from qdsl.graph.naming import name_graph
from qdsl.lang import parse_recipe
from qdsl.passes import pipeline as P
from qdsl.passes.pipeline import FAKE, INT8, OBSERVE, Pass, PassContext, run
from qdsl.plan import build_plan
from tiny import Toy, tiny, tiny_ids


def _toy(recipe: str = "* -> w8a8"):
    torch.manual_seed(0)
    cap = capture(Toy().eval(), (torch.randn(4, 16),))
    named = name_graph(cap)
    return cap.gm, PassContext(named, build_plan(parse_recipe(recipe), named))


def test_the_runner_logs_each_pass_and_records_what_it_ensures(caplog):
    gm, ctx = _toy()
    with caplog.at_level(logging.INFO, logger="qdsl.passes.pipeline"):
        run(OBSERVE, gm, ctx)
    logged = [r.getMessage() for r in caplog.records if r.name == "qdsl.passes.pipeline"]
    assert [m.split(":")[0] for m in logged] == ["pass validate_plan", "pass rotate",
                                                 "pass smooth", "pass insert_observers",
                                                 "pass insert_input_stats",
                                                 "pass fuse_unplanned_attention"]
    assert all(m.endswith(" ms") for m in logged)
    assert {"validated", "observed"} <= ctx.properties and set(ctx.observers) == {"fc1", "fc2"}


def test_a_pass_whose_requires_do_not_hold_is_refused_by_name():
    gm, ctx = _toy()
    with pytest.raises(GraphError, match=r"pass lower_fake requires frozen"):
        run(FAKE, gm, ctx)
    with pytest.raises(GraphError, match=r"pass insert_observers requires validated"):
        run(OBSERVE[1:], gm, ctx)
    assert ctx.observers is None   # nothing ran


def _delete_a_weight(gm, ctx):
    """A broken pass: deletes the attribute the first get_attr node reads."""
    target = next(n.target for n in gm.graph.nodes if n.op == "get_attr")
    path, _, name = target.rpartition(".")
    delattr(gm.get_submodule(path) if path else gm, name)
    return gm


def test_check_names_the_pass_that_broke_the_graph():
    broken = Pass("delete_a_weight", _delete_a_weight)
    run([broken], *_toy())                       # unchecked: nobody notices
    gm, ctx = _toy()
    with pytest.raises(GraphError, match=r"pass delete_a_weight broke the graph \(after "
                                         r"validate_plan\): .*fc1.weight"):
        run([P.VALIDATE_PLAN, broken], gm, ctx, check=True)


def _unquantize_fc1(gm, ctx):
    """A broken pass: fc1's readers read it unquantized (the graph still lints)."""
    q = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "qdsl_act__fc1")
    q.replace_all_uses_with(q.args[0])
    gm.graph.erase_node(q)
    gm.recompile()
    return gm


def test_check_catches_a_planned_node_that_lost_its_quantizer():
    gm, ctx = _toy("fc1 -> a8 dynamic\nfc2 -> w8")
    run([P.VALIDATE_PLAN], gm, ctx)
    ctx.observers, ctx.input_stats = {}, {}
    gm = run(P.FREEZE + FAKE, gm, ctx, check=True)          # the real passes pass
    with pytest.raises(GraphError, match=r"pass unquantize broke the graph .*activation "
                                         r"quantizer of fc1") as e:
        run([Pass("unquantize", _unquantize_fc1)], gm, ctx, check=True)
    assert e.value.node == "fc1"


def test_lower_int8_and_fuse_attention_are_separate_steps():
    # lower_fake no longer drops no-ops itself, lower_int8 no longer fuses attention
    names = [p.name for p in INT8]
    assert names == ["rotate", "smooth", "lower_fake", "drop_noops", "lower_int8",
                     "fuse_attention", "kv_cache"]
    # fake runs float attention fused too (only the filled part of the cache; chains
    # with a quantizer inside stay as they are)
    assert [p.name for p in FAKE] == names[:4] + ["fuse_attention", "kv_cache"]


@pytest.mark.parametrize("lower", ["fake", "int8"])
def test_compile_passes_every_check(lower):
    recipe = "* -> w8 sym per_channel\nblock.*.ln_1 -> a8 asym per_tensor dynamic\n" \
             "block.*.ln_2 -> a8 per_tensor static\n"
    m = tiny("gpt2")
    ids = tiny_ids(m, 2, 12)
    q = C.compile(m, recipe, calib=tiny_ids(m, 2, 16), lower=lower, max_cache_len=32,
                  progress=False, check=True)
    plain = C.compile(m, recipe, calib=tiny_ids(m, 2, 16), lower=lower, max_cache_len=32,
                      progress=False)
    assert torch.equal(q(ids), plain(ids))   # checking changes nothing


def test_calibrate_and_record_run_through_the_runner():
    """Calibration and the study's recorders are passes of named pipelines: CALIBRATE
    feeds the observers (and refuses to freeze nothing: no data is a named error),
    RECORD inserts recorders and feeds them, FEED feeds more."""
    from qdsl.passes.pipeline import CALIBRATE, FEED, FREEZE, RECORD, Feed

    gm, ctx = _toy("* -> w8a8")
    run(OBSERVE, gm, ctx)
    with pytest.raises(GraphError, match="pass calibrate: 2 static activation observers"):
        run(CALIBRATE, gm, ctx)
    x = torch.randn(8, 16)                   # the toy graph takes batches of 4
    ctx.feed = Feed(gm, x, batch_size=4)
    gm = run(CALIBRATE + FREEZE + FAKE, gm, ctx, check=True)
    assert {"calibrated", "frozen"} <= ctx.properties
    fq = ctx.frozen.activations["fc1"]        # static a8 of fc1's output, on x's range
    obs = ctx.observers["fc1"]
    assert obs.max_val.numel() and fq.spec == ctx.plan["fc1"].activation

    gm2, rctx = _toy("* -> w8a8")
    batches = [torch.randn(4, 16), torch.randn(4, 16)]
    rctx.record_names, rctx.feed = ["fc1", "fc2"], Feed(gm2, batches[:1])
    with pytest.raises(GraphError, match="pass record requires recording"):
        run(FEED, gm2, rctx)
    run(RECORD, gm2, rctx)
    rec = rctx.recorders["fc2"]
    assert len(rec.max_abs) == 1
    assert rec.max_abs[0] == pytest.approx(float(gm2(batches[0]).detach().abs().max()))
    rctx.feed = Feed(gm2, batches[1:])
    run(FEED, gm2, rctx)
    assert len(rec.max_abs) == 3      # the direct call above, then the second batch
