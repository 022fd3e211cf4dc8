"""A calibration stopped part way resumes from its checkpoint and ends where an
uninterrupted one does (observers, their sampling generators, GPTQ's recorders)."""

import functools
import warnings

import pytest
import torch
from tiny import tiny, tiny_ids

import qdsl.compiler as C
from qdsl.passes import pipeline
from qdsl.passes.calibrate import CalibrationCheckpoint, calibrate
from qdsl.quant.hessian import InputStats
from qdsl.quant.observers import MSEObserver, PercentileObserver, RunningMinMaxObserver


def _modules():
    return {"mse": MSEObserver(8, True, max_samples=300),
            "pct": PercentileObserver(8, False, max_samples=200),
            "ema": RunningMinMaxObserver(8, False),
            "stats": InputStats()}


def _runner(mods, stop_at=None):
    seen = []

    def run(batch):
        if stop_at is not None and len(seen) == stop_at:
            raise KeyboardInterrupt
        seen.append(1)
        x = torch.sin(batch.float() * 0.37)[..., None] * torch.arange(1, 9)  # [B, T, 8]
        for m in mods.values():
            m(x)
    return run


def _state(mods):
    return {f"{n}.{k}": v for n, m in mods.items() for k, v in m.calib_state().items()}


def test_stopped_and_resumed_equals_uninterrupted(tmp_path):
    windows = torch.randint(0, 1000, (12, 40), generator=torch.Generator().manual_seed(3))
    ref = _modules()
    calibrate(_runner(ref), windows, progress=False)
    path = tmp_path / "c.safetensors"
    first = _modules()
    with pytest.raises(KeyboardInterrupt):
        calibrate(_runner(first, stop_at=7), windows, progress=False,
                  checkpoint=CalibrationCheckpoint(path, first, "job", every=0))
    assert path.exists()
    again = _modules()
    run = _runner(again)
    calibrate(run, windows, progress=False,
              checkpoint=CalibrationCheckpoint(path, again, "job", every=0))
    assert not path.exists()                      # removed once every batch ran
    a, b = _state(ref), _state(again)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert again["stats"].count == ref["stats"].count


def test_a_checkpoint_of_another_calibration_is_ignored(tmp_path, caplog):
    windows = torch.randint(0, 1000, (6, 20), generator=torch.Generator().manual_seed(4))
    path = tmp_path / "c.safetensors"
    mods = _modules()
    with pytest.raises(KeyboardInterrupt):
        calibrate(_runner(mods, stop_at=3), windows, progress=False,
                  checkpoint=CalibrationCheckpoint(path, mods, "job A", every=0))
    fresh = _modules()
    run = _runner(fresh)
    calibrate(run, windows, progress=False,
              checkpoint=CalibrationCheckpoint(path, fresh, "job B", every=0))
    assert "of another calibration" in caplog.text
    ref = _modules()
    calibrate(_runner(ref), windows, progress=False)
    assert torch.equal(fresh["mse"].sample, ref["mse"].sample)


def test_unreadable_checkpoint_starts_over(tmp_path, caplog):
    path = tmp_path / "c.safetensors"
    path.write_bytes(b"not safetensors")
    mods = _modules()
    calibrate(_runner(mods), torch.ones(3, 5, dtype=torch.long), progress=False,
              checkpoint=CalibrationCheckpoint(path, mods, "", every=0))
    assert "unreadable" in caplog.text and not path.exists()


def test_compile_resumes_a_stopped_calibration(tmp_path, monkeypatch):
    """End to end: qdsl.compile stopped after 2 of 5 windows, then run again with the
    same checkpoint, freezes what an uninterrupted compile freezes."""
    from qdsl.runtime.graphlm import GraphLM
    recipe = ("* -> w8 sym per_channel\ntype:Linear.input -> a8 sym per_tensor mse static\n")
    m = tiny("llama")
    ids = tiny_ids(m, 5, 16)
    ck = (tmp_path / "calib.safetensors", "key")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = C.compile(m, recipe, calib=ids, max_cache_len=32, progress=False)
        calls = []
        logits = GraphLM.logits

        def stop(self, x):
            if len(calls) == 2:
                raise KeyboardInterrupt
            calls.append(1)
            return logits(self, x)

        monkeypatch.setattr(GraphLM, "logits", stop)
        monkeypatch.setattr(pipeline, "CalibrationCheckpoint",
                            functools.partial(CalibrationCheckpoint, every=0.0))
        with pytest.raises(KeyboardInterrupt):
            C.compile(tiny("llama"), recipe, calib=ids, max_cache_len=32, progress=False,
                      calib_checkpoint=ck)
        assert ck[0].exists()
        monkeypatch.setattr(GraphLM, "logits", logits)
        again = C.compile(tiny("llama"), recipe, calib=ids, max_cache_len=32,
                          progress=False, calib_checkpoint=ck)
    assert not ck[0].exists()
    a, b = ref.frozen.to_state()[1], again.frozen.to_state()[1]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
