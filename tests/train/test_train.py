"""qdsl train on tiny models: the distillation loss falls, a resumed run computes the
same next loss, an interrupted save keeps the last checkpoint, and the trained 1-bit
artifact reloads bit-identically with its weights packed at 1 bit each."""

from __future__ import annotations

import shutil

import pytest
import torch

import qdsl
from qdsl.errors import ModelError
from qdsl.runtime.packed import PackedLinear
from qdsl.train import checkpoint
from qdsl.config.spec import WEIGHT, PerChannel, TensorSpec
from qdsl.train.loop import TrainConfig, Trainer, dampen_at, lr_at, train
from qdsl.train.qat import Freezer, code_distance
from tiny import tiny

W1A8 = """\
*                    -> w8 sym per_channel
block.*.attn.qkv     -> w1 sym per_channel
block.*.attn.out     -> w1 sym per_channel
block.*.mlp.c_fc     -> w1 sym per_channel
block.*.mlp.c_proj   -> w1 sym per_channel
block.*.ln_1         -> a8 sym per_token dynamic
block.*.attn.context -> a8 sym per_token dynamic
block.*.ln_2         -> a8 sym per_token dynamic
block.*.mlp.act      -> a8 sym per_token dynamic
"""


def streams(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # a learnable stream: a short repeating pattern with noise
    base = torch.arange(1, 40).repeat(200)
    noise = torch.randint(1, 128, base.shape, generator=g)
    keep = torch.rand(base.shape, generator=g) < 0.8
    s = torch.where(keep, base, noise).to(torch.int32)
    return {"train": s[:6000], "valid": s[6000:]}


def cfg(**kw) -> TrainConfig:
    base = dict(steps=50, batch_size=4, seq_len=16, lr=3e-3, warmup=0.1, ckpt_every=0,
                eval_windows=4)
    return TrainConfig(**{**base, **kw})


def test_schedule_warms_up_then_decays_to_zero():
    c = cfg(steps=10, warmup=0.2, lr=1.0)
    assert [round(lr_at(s, c), 3) for s in range(10)] == \
        [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]


@pytest.mark.slow
def test_distillation_loss_decreases_over_50_steps(tmp_path):
    # weights large enough that the teacher's logits say something (init 0.2, not 0.02)
    teacher = tiny("gpt2", initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0,
                   attn_pdrop=0.0)
    t = Trainer("set student.blocks = \"1\"\n" + W1A8, teacher, tmp_path, cfg(),
                data_streams=streams())
    assert t.layer_map == (1,)
    t.fit(progress=False)
    losses = [h["loss"] for h in t.history]
    assert len(losses) == 50 and all(map(torch.isfinite, torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)


def test_resume_reproduces_the_next_loss(tmp_path):
    model = tiny("gpt2")   # dropout 0.1: the student's RNG state is part of the checkpoint
    a = Trainer(W1A8, model, tmp_path, cfg(steps=4), data_streams=streams())
    a.train_step()
    a.train_step()
    a.save()                                            # the checkpoint at step 2
    a.train_step()
    a.train_step()
    torch.manual_seed(12345)                            # whatever the generator holds now
    b = Trainer(W1A8, model, tmp_path, cfg(steps=4), data_streams=streams())
    b.resume()
    assert b.step == 2 and b.tokens == 2 * 4 * 16
    assert b.train_step()["loss"] == a.history[2]["loss"]   # exactly the same next loss
    assert b.train_step()["loss"] == a.history[3]["loss"]
    for (k, p), (_, q) in zip(a.student.named_parameters(), b.student.named_parameters()):
        assert torch.equal(p, q), k


def test_resume_refuses_another_recipe(tmp_path):
    model = tiny("gpt2")
    a = Trainer(W1A8, model, tmp_path, cfg(steps=1, ckpt_every=1), data_streams=streams())
    a.fit(progress=False)
    other = W1A8.replace("w8 sym per_channel", "w4 sym per_channel")
    b = Trainer(other, model, tmp_path, cfg(steps=1), data_streams=streams())
    with pytest.raises(ModelError, match="another recipe"):
        b.resume()


def test_an_interrupted_save_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    t = Trainer(W1A8, tiny("gpt2"), tmp_path, cfg(steps=3, ckpt_every=1), data_streams=streams())
    t.train_step()
    t.save()
    saved = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    t.train_step()

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        t.save()
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == saved
    monkeypatch.undo()
    fresh = Trainer(W1A8, tiny("gpt2"), tmp_path, cfg(steps=3), data_streams=streams())
    fresh.resume()
    assert fresh.step == 1


def test_trained_1bit_artifact_reloads_bit_identically(tmp_path):
    t = Trainer(W1A8, tiny("gpt2"), tmp_path / "run", cfg(steps=3), data_streams=streams())
    t.fit(progress=False)
    qm = t.export(tmp_path / "out")
    loaded = qdsl.load(tmp_path / "out")
    ids = streams()["valid"][:12].long().unsqueeze(0)
    assert torch.equal(qm(ids), loaded(ids))
    packed = [m for m in loaded.gm.modules() if isinstance(m, PackedLinear) and m.bits == 1]
    assert len(packed) == 8                                 # 4 linears x 2 blocks
    for m in packed:
        assert m.weight_packed.dtype == torch.uint8
        assert m.weight_packed.shape == (m.out_features, (m.in_features + 7) // 8)
    # the trained weights are what was packed: sign of the student's float weight
    c_fc = t.student.transformer.h[0].mlp.c_fc.weight.detach().t()     # [out, in]
    m = loaded.gm.get_submodule(next(n for n, x in loaded.gm.named_modules()
                                     if x is packed[2]))
    from qdsl.runtime.packing import unpack_int
    bits = unpack_int(m.weight_packed, 1, m.in_features)
    assert torch.equal(bits.bool(), c_fc >= 0)


def test_train_refuses_a_run_that_holds_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    t = Trainer(W1A8, tiny("gpt2"), run, cfg(steps=1, ckpt_every=1), data_streams=streams())
    t.fit(progress=False)
    with pytest.raises(ModelError, match="--resume"):
        train(W1A8, tiny("gpt2"), None, run=run, config=cfg(steps=1))
    shutil.rmtree(run)


def test_recipe_loss_weights(tmp_path):
    """`set train.*` weighs XTC's terms: hidden and attention off leaves the logit KL."""
    text = "set train.hidden = 0\nset train.attn = 0\nset train.logits = 2.5\n" + W1A8
    t = Trainer(text, tiny("gpt2"), tmp_path, cfg(steps=1), data_streams=streams())
    w = t.loss_weights()
    assert (w.logits, w.hidden, w.attn) == (2.5, 0.0, 0.0)
    rec = t.train_step()
    assert rec["hidden"] > 0 and rec["attn"] > 0          # measured, not counted
    assert rec["loss"] == pytest.approx(2.5 * rec["logits"], rel=1e-6)
    assert Trainer(W1A8, tiny("gpt2"), tmp_path, cfg(), data_streams=streams()).loss_weights() \
        == type(w)(1.0, 1.0, 1.0)


def test_dampen_schedule_rises_from_zero_to_the_weight():
    assert dampen_at(0, 10, 0.5) == 0.0
    assert dampen_at(5, 10, 0.5) == pytest.approx(0.25)
    assert dampen_at(10, 10, 0.5) == pytest.approx(0.5)
    ws = [dampen_at(s, 100, 1.0) for s in range(101)]
    assert ws == sorted(ws)


def test_code_distance_pulls_latent_weights_to_their_grid_points():
    """1-bit: |w| towards mean|w|, sign kept; 4-bit: the distance to the rounded value
    in units of the scale."""
    w = torch.tensor([[0.1, -0.3, 0.2, -0.4]], requires_grad=True)
    d, n = code_distance(w, TensorSpec(WEIGHT, 1, granularity=PerChannel()))
    alpha = 0.25  # mean|w|
    assert n == 4
    assert float(d.detach()) == pytest.approx(sum((v / alpha - 1) ** 2 for v in (0.1, 0.3, 0.2, 0.4)),
                                     rel=1e-5)
    d.backward()
    step = w.detach() - 0.01 * w.grad   # gradient descent on the term
    assert torch.all(torch.sign(step) == torch.sign(w.detach()))
    assert torch.all((step.abs() - alpha).abs() < (w.detach().abs() - alpha).abs())
    x = torch.tensor([[0.7, -0.04, 0.33, 0.0]])
    d4, _ = code_distance(x, TensorSpec(WEIGHT, 4))   # scale 0.7 / 7 = 0.1
    assert float(d4) == pytest.approx(0.4 ** 2 + 0.3 ** 2, rel=1e-4)


def test_dampening_is_recorded_and_holds_the_1bit_signs(tmp_path):
    """`set train.dampen`: the step records the code distance and the fraction of 1-bit
    weights whose sign flipped; a strong dampening flips fewer signs than none, on the
    same batches at the same learning rate."""
    flips = {}
    for lam in (0.0, 50.0):
        text = (f"set train.dampen = {lam}\n" if lam else "") + W1A8
        t = Trainer(text, tiny("gpt2"), tmp_path / str(lam), cfg(steps=20, lr=3e-2, warmup=0.0),
                    data_streams=streams())
        assert t.dampen_weight() == lam
        recs = [t.train_step() for _ in range(20)]
        assert all(0.0 <= r["flips"] <= 1.0 for r in recs)
        assert ("dampen" in recs[-1]) == bool(lam)
        flips[lam] = sum(r["flips"] for r in recs[10:])
    assert flips[50.0] < flips[0.0], flips


def test_recipe_learning_rate_and_warmup_defaults_and_overrides(tmp_path):
    """`set train.lr|warmup` set the schedule; an explicit config (the command line's
    --lr / --warmup) wins; neither: de Moor's 5e-4 and 0.2."""
    text = "set train.lr = 5e-5\nset train.warmup = 0.05\n" + W1A8
    plain = cfg(lr=None, warmup=None)
    t = Trainer(text, tiny("gpt2"), tmp_path / "a", plain, data_streams=streams())
    assert (t.cfg.lr, t.cfg.warmup) == (5e-5, 0.05)
    assert t.opt.param_groups[0]["lr"] == 5e-5
    assert t.identity()["config"]["lr"] == 5e-5          # the run records what it used
    t = Trainer(text, tiny("gpt2"), tmp_path / "b", cfg(lr=1e-3, warmup=None),
                data_streams=streams())
    assert (t.cfg.lr, t.cfg.warmup) == (1e-3, 0.05)
    t = Trainer(W1A8, tiny("gpt2"), tmp_path / "c", plain, data_streams=streams())
    assert (t.cfg.lr, t.cfg.warmup) == (5e-4, 0.2)


def test_freezer_freezes_an_oscillating_weight_at_its_majority_sign():
    """A weight pushed across zero at every step is frozen once its flip frequency passes
    the threshold, at the sign it held most, and stays there; a weight that never flips
    is left alone."""
    w = torch.nn.Parameter(torch.tensor([[0.01, 0.5]]))
    fr = Freezer([w], threshold=0.03)
    frozen_at = None
    for step in range(40):
        before = [w.detach() >= 0]
        with torch.no_grad():   # "the optimizer": weight 0 alternates, mostly positive
            w[0, 0] = -0.01 if step % 3 == 1 else 0.01
            w[0, 1] += 0.001
        frac = fr.step(before)
        if frac and frozen_at is None:
            frozen_at = step
            assert frac == 0.5 and float(w.detach()[0, 0]) > 0       # the majority sign
    assert frozen_at is not None and 2 <= frozen_at <= 10, frozen_at
    assert bool(fr.frozen[0][0, 0]) and not bool(fr.frozen[0][0, 1])
    assert float(w[0, 0]) == float(fr.value[0][0, 0]) > 0    # held, whatever the steps did
    assert float(w[0, 1]) == pytest.approx(0.54)             # the other weight trains on


def test_freezing_stops_flips_and_resumes_exactly(tmp_path):
    """`set train.freeze`: at a rate that makes 1-bit weights oscillate, frozen weights
    accumulate and the flips fall below the unfrozen run's on the same batches; the
    freezer's state goes through the checkpoint (the next loss is the same)."""
    flips, model = {}, tiny("gpt2")
    for name, text in (("free", W1A8), ("freeze", "set train.freeze = 0.01\n" + W1A8)):
        t = Trainer(text, model, tmp_path / name, cfg(steps=40, lr=3e-2, warmup=0.0),
                    data_streams=streams())
        recs = [t.train_step() for _ in range(30)]
        flips[name] = sum(r["flips"] for r in recs[15:])
        if name == "freeze":
            frozen = [r["frozen"] for r in recs]
            assert frozen == sorted(frozen) and frozen[-1] > 0.1, frozen[-1]
            t.save()
            a = [t.train_step() for _ in range(2)]
            b = Trainer(text, model, tmp_path / name, cfg(steps=40, lr=3e-2, warmup=0.0),
                        data_streams=streams())
            b.resume()
            assert [b.train_step()["loss"] for _ in range(2)] == [r["loss"] for r in a]
            for x, y in zip(t.freezer.frozen, b.freezer.frozen):
                assert torch.equal(x, y)
    assert flips["freeze"] < 0.5 * flips["free"], flips


def test_freeze_and_learned_scales_need_1bit_weights(tmp_path):
    for setting in ("train.freeze = 0.02", "train.scales = learned"):
        with pytest.raises(ModelError, match=setting.split(" =")[0]):
            Trainer(f"set {setting}\n* -> w8 sym per_channel\n", tiny("gpt2"), tmp_path,
                    cfg(), data_streams=streams())


def test_learned_scales_train_and_reach_the_artifact(tmp_path):
    """`set train.scales = learned`: each 1-bit row's scale starts at mean|W|, receives a
    gradient and moves; the exported artifact's 1-bit scales are the learned ones and its
    signs the latent weights' (the scales are baked into the latent weight on export)."""
    text = "set train.scales = learned\n" + W1A8
    t = Trainer(text, tiny("gpt2"), tmp_path / "run", cfg(steps=5, lr=3e-2, warmup=0.0),
                data_streams=streams())
    c_fc = t.student.transformer.h[0].mlp.c_fc
    quant = c_fc.parametrizations.weight[0]
    scale = quant.scale
    w0 = c_fc.parametrizations.weight.original.detach().t()       # Conv1D: [in, out] -> [out, in]
    assert torch.allclose(scale.detach().flatten(), w0.abs().mean(1), rtol=1e-6)
    assert any(n.endswith("weight.0.log_scale") for n, _ in t.student.named_parameters())
    assert t.opt.param_groups[1]["weight_decay"] == 0.0 and t.opt.param_groups[1]["params"]
    start = scale.detach().clone()
    t.fit(progress=False)
    learned = quant.scale.detach().flatten().clone()
    assert not torch.allclose(learned, start.flatten())             # trained
    t.save()                                                        # and checkpointed
    b = Trainer(text, tiny("gpt2"), tmp_path / "run", cfg(steps=5, lr=3e-2, warmup=0.0),
                data_streams=streams())
    b.resume()
    assert torch.equal(b.student.transformer.h[0].mlp.c_fc.parametrizations.weight[0].log_scale,
                       quant.log_scale)
    signs = c_fc.parametrizations.weight.original.detach().t() >= 0
    t.export(tmp_path / "out")
    loaded = qdsl.load(tmp_path / "out")
    packed = [m for m in loaded.gm.modules() if isinstance(m, PackedLinear) and m.bits == 1]
    m = packed[2]                                                   # block 0's c_fc, as above
    assert torch.allclose(m.weight_scale.flatten(), learned, rtol=1e-5)
    from qdsl.runtime.packing import unpack_int
    assert torch.equal(unpack_int(m.weight_packed, 1, m.in_features).bool(), signs)


def test_learned_scales_are_a_recipe_choice(tmp_path):
    from qdsl.lang import parse_recipe
    assert parse_recipe("set train.scales = learned\n" + W1A8).settings.train_scales == "learned"
    with pytest.raises(Exception, match="train.scales"):
        parse_recipe("set train.scales = median\n" + W1A8)
