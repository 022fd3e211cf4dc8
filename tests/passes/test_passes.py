"""Each pass alone on toy modules, asserting on the graph; then the chain on tiny LMs."""

from __future__ import annotations

import pytest
import torch

import qdsl
from qdsl.compiler import explain
from qdsl.artifact.store import atomic_dir
from qdsl.graph.capture import capture
from qdsl.errors import ArtifactError
from qdsl.runtime.fakequant import DynamicFakeQuant, FakeQuant
from qdsl.lang import parse_recipe
from qdsl.graph.naming import name_graph
from qdsl.quant.observers import Observer
from qdsl.passes.calibrate import calibrate
from qdsl.passes.freeze import freeze
from qdsl.passes.insert_observers import insert_observers
from qdsl.passes.lower_fake import lower_fake
from qdsl.plan import build_plan
from tiny import Toy, tiny, tiny_ids


def _toy(recipe: str):
    torch.manual_seed(0)
    model = Toy().eval()
    cap = capture(model, (torch.randn(4, 16),))
    named = name_graph(cap)
    plan = build_plan(parse_recipe(recipe), named)
    return model, cap.gm, named, plan


def _modules(gm, cls):
    return {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), cls)}


def test_insert_observers_keeps_the_function_and_marks_the_nodes():
    model, gm, named, plan = _toy("fc1 -> a8\nfc2 -> a8 dynamic\n")
    x = torch.randn(4, 16)  # the toy graph's batch is static
    obs = insert_observers(gm, named, plan)
    assert set(obs) == {"fc1"}  # dynamic activations need no observer
    assert list(_modules(gm, Observer)) == ["qdsl_act__fc1"]
    torch.testing.assert_close(gm(x), model(x))  # observers return their input


def test_calibrate_then_freeze_then_lower():
    model, gm, named, plan = _toy("* -> w8a8\nfc2 -> a8 dynamic\n")
    source = {k: v.detach().clone() for k, v in model.state_dict().items()}
    obs = insert_observers(gm, named, plan)
    calibrate(gm, torch.randn(64, 16), batch_size=4, progress=False)
    frozen = freeze(gm, named, plan, obs)
    assert isinstance(frozen.activations["fc1"], FakeQuant)
    assert isinstance(frozen.activations["fc2"], DynamicFakeQuant)
    assert set(frozen.weights) == {"fc1", "fc2"}
    gm = lower_fake(gm, named, plan, frozen)
    assert not _modules(gm, Observer)  # observers replaced by frozen modules
    assert len(_modules(gm, FakeQuant)) == 1 and len(_modules(gm, DynamicFakeQuant)) == 1
    w_hat = gm.get_parameter("qdsl_weight__fc1")
    assert w_hat.unique().numel() <= 255 * 32  # on an 8-bit per-channel grid
    # the source model is untouched (capture shares its tensors with the graph)
    assert [k for k, v in model.state_dict().items() if not torch.equal(v, source[k])] == []
    assert not torch.equal(w_hat, model.fc1.weight)
    x = torch.randn(4, 16)
    assert (gm(x) - model(x)).abs().max() < 0.05


def test_16_bit_is_close_to_float():
    model = tiny("llama")
    calib = tiny_ids(model, 16, 32)
    ids = tiny_ids(model, 1, 20, seed=9)
    ref = model(ids, use_cache=False).logits
    qm = qdsl.compile(model, "* -> w16a16\n", calib=calib, progress=False)
    assert (qm(ids) - ref).abs().max() / ref.abs().max() < 0.02
    assert (qm(ids).argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_res_sum_rule_changes_exactly_the_res_sum_quantizers():
    model = tiny("gpt2")
    calib = tiny_ids(model, 4, 16)
    base = qdsl.compile(model, "* -> w8a8\n", calib=calib, progress=False)
    mixed = qdsl.compile(model, "* -> w8a8\nblock.*.res_sum -> a16\n", calib=calib,
                         progress=False)
    changed = {e.name for e, f in zip(base.plan.entries, mixed.plan.entries) if e != f}
    assert changed == {"block.0.res_sum", "block.1.res_sum"}
    for name, m in base.frozen.activations.items():
        other = mixed.frozen.activations[name]
        if name in changed:
            assert other.bits == 16 and m.bits == 8
        else:
            torch.testing.assert_close(m.state_dict(), other.state_dict())


def test_artifact_round_trip_and_source_check(tmp_path):
    model = tiny("gpt2")
    qm = qdsl.compile(model, "* -> w8a8\nlm_head -> skip\n", calib=tiny_ids(model, 4, 16),
                      progress=False)
    out = qm.save(tmp_path / "art")
    ids = tiny_ids(model, 1, 10, seed=3)
    back = qdsl.load(out, model)
    assert torch.equal(back(ids), qm(ids))
    assert back.plan == qm.plan
    with pytest.raises(ArtifactError, match="not this one"):
        qdsl.load(out, tiny("gpt2", seed=1))
    with pytest.raises(ArtifactError, match="exists"):
        qm.save(tmp_path / "art")


def test_artifact_reloads_with_a_longer_cache(tmp_path):
    model = tiny("gpt2")
    qm = qdsl.compile(model, "* -> w8a8\n", calib=tiny_ids(model, 4, 8), max_cache_len=12,
                      progress=False)
    out = qm.save(tmp_path / "art")
    longer = qdsl.load(out, model, max_cache_len=24)
    assert longer.max_cache_len == 24 and longer.plan == qm.plan
    assert longer.named.graph_hash != qm.named.graph_hash  # the cache length is a constant
    ids = tiny_ids(model, 1, 10, seed=3)
    torch.testing.assert_close(longer(ids), qm(ids))
    assert longer(tiny_ids(model, 1, 20, seed=3)).shape[1] == 20  # past the old cache
    with pytest.raises(ArtifactError, match="not this one"):
        qdsl.load(out, tiny("gpt2", seed=1), max_cache_len=24)


def test_interrupted_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "out") as d:
            (d / "half").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_group_size_that_does_not_divide_is_named_before_any_data():
    from qdsl.errors import GraphError

    with pytest.raises(GraphError) as e:
        explain("* -> w4 group(size=24)\n", tiny("llama"))  # hidden 32
    assert e.value.node == "embed" and "does not divide the 32 input columns" in str(e.value)


def test_peg_k_that_does_not_divide_is_named():
    from qdsl.errors import GraphError

    with pytest.raises(GraphError) as e:
        explain("ln_f -> a8 per_group(K=3)\n", tiny("gpt2"))
    assert e.value.node == "ln_f" and "hidden size 32" in str(e.value)


def test_calibration_windows_longer_than_the_model_are_refused():
    from qdsl.models.calib import CalibrationError

    model = tiny("gpt2")  # 64 positions
    with pytest.raises(CalibrationError, match="--seq-len 63"):
        qdsl.compile(model, "* -> a8\n", calib=tiny_ids(model, 2, 80), progress=False)
