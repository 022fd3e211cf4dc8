"""`qdsl train --init`: XTC's two steps (a trained float student, then the quantized
student trained from it): the weights are taken over by name, and a wrong artifact
is refused with the reason."""

from __future__ import annotations

import pytest
import torch

from qdsl.errors import ModelError
from qdsl.train.loop import Trainer
from test_train import W1A8, cfg, streams
from tiny import tiny

STEP1 = "set student.blocks = every_other\n* -> skip\n"
STEP2 = "set student.blocks = every_other\n" + W1A8


@pytest.fixture(scope="module")
def step1(tmp_path_factory):
    d = tmp_path_factory.mktemp("step1")
    t = Trainer(STEP1, tiny("gpt2"), d / "run", cfg(steps=3), data_streams=streams())
    t.fit(progress=False)
    t.export(d / "out")
    return t, d / "out"


def _floats(model):
    """name -> weight, through the quantizers' parametrizations (their float originals)."""
    out = {}
    for name, p in model.named_parameters():
        out[name.replace(".parametrizations.weight.original", ".weight")] = p.detach()
    return out


def test_init_takes_the_trained_student_weights(step1, tmp_path):
    t1, art = step1
    t2 = Trainer(STEP2, tiny("gpt2"), tmp_path, cfg(steps=1), data_streams=streams(),
                 init=art)
    want, got = _floats(t1.student), _floats(t2.student)
    assert set(want) == set(got) and want
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # and not the teacher's: training changed them
    fresh = Trainer(STEP2, tiny("gpt2"), tmp_path / "x", cfg(steps=1), data_streams=streams())
    assert any(not torch.equal(_floats(fresh.student)[k], want[k]) for k in want)
    assert t2.init["sha256"] and t2.identity()["init"] == t2.init


def test_resume_refuses_another_init(step1, tmp_path):
    _, art = step1
    t = Trainer(STEP2, tiny("gpt2"), tmp_path, cfg(steps=2, ckpt_every=1),
                data_streams=streams(), init=art)
    t.fit(progress=False)
    other = Trainer(STEP2, tiny("gpt2"), tmp_path, cfg(steps=2), data_streams=streams())
    with pytest.raises(ModelError, match="another --init"):
        other.resume()


def test_init_refuses_other_blocks_and_quantized_weights(step1, tmp_path):
    _, art = step1
    with pytest.raises(ModelError, match="student.blocks"):
        Trainer(W1A8, tiny("gpt2"), tmp_path, cfg(), data_streams=streams(), init=art)
    q = Trainer(STEP2, tiny("gpt2"), tmp_path / "q", cfg(steps=1), data_streams=streams())
    q.fit(progress=False)
    q.export(tmp_path / "qout")
    with pytest.raises(ModelError, match="quantized"):
        Trainer(STEP2, tiny("gpt2"), tmp_path / "r", cfg(), data_streams=streams(),
                init=tmp_path / "qout")
    with pytest.raises(ModelError, match="not a qdsl artifact"):
        Trainer(STEP2, tiny("gpt2"), tmp_path / "s", cfg(), data_streams=streams(),
                init=tmp_path)
