"""Observers (qdsl/quant/observers.py): semantics, shapes, MSE vs min-max, state round trip."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load, save
from strategies import activations, float_tensors, matrices

from qdsl.quant import search
from qdsl.quant.observers import (CurrentMinMaxObserver, MeanAbsObserver, MinMaxObserver,
                                  MSEObserver, PercentileObserver, RunningMinMaxObserver,
                                  kth_percentile, make_observer, mse_search, observer_from_json)
from qdsl.quant.primitives import choose_qparams, fake_quantize, group_unview, group_view, reduce_range
from qdsl.config.spec import (ACTIVATION, MSE, WEIGHT, GroupWise, MinMax, Percentile, PerChannel,
                              PerGroup, PerTensor, PerToken, RunningMinMax, TensorPatch, resolve)


def _sq_err(w, scale, zp, bits, symmetric, granularity):
    if isinstance(granularity, GroupWise):
        y = group_unview(fake_quantize(group_view(w, granularity.size), scale, zp, bits, symmetric))
    else:
        y = fake_quantize(w, scale, zp, bits, symmetric)
    return (y - w).square()


# --- min-max ------------------------------------------------------------------------


def test_minmax_weight_and_latest_batch():
    w = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    o = MinMaxObserver(8, True, PerChannel(), WEIGHT)
    assert o(w) is w
    s, z = o.qparams()
    assert torch.allclose(s, torch.tensor([[2.0], [4.0]]) / 127) and z.shape == (2, 1)
    a = MinMaxObserver(8, False)
    a(torch.tensor([-5.0, 5.0]))
    a(torch.tensor([-1.0, 2.0]))
    assert (a.min_val.item(), a.max_val.item()) == (-5.0, 5.0)  # all batches
    c = CurrentMinMaxObserver(8, False)
    c(torch.tensor([-5.0, 5.0]))
    c(torch.tensor([-1.0, 2.0]))
    assert (c.min_val.item(), c.max_val.item()) == (-1.0, 2.0)  # current = latest batch


def test_running_minmax_worked_example():
    o = RunningMinMaxObserver(8, False, momentum=0.9)
    o(torch.tensor([-1.0, 1.0]))
    o(torch.tensor([-3.0, 2.0]))
    assert o.min_val.item() == pytest.approx(-1.2) and o.max_val.item() == pytest.approx(1.1)


def test_no_data_is_an_error():
    with pytest.raises(RuntimeError, match="observed no data"):
        MinMaxObserver(8, True).qparams()


# --- MSE -------------------------------------------------------------------------------


@given(matrices(col_multiple=4), st.integers(2, 8), st.booleans(),
       st.sampled_from([PerTensor(), PerChannel(), GroupWise(4)]), st.sampled_from([1, 7, 20]))
def test_mse_never_worse_than_minmax(w, bits, symmetric, gran, candidates):
    """Per group (row, block, tensor) the MSE range's squared error <= min-max's: the
    candidate k = n is the min-max range and every search stage keeps its winner."""
    mse = MSEObserver(bits, symmetric, gran, WEIGHT, candidates=candidates)
    mm = MinMaxObserver(bits, symmetric, gran, WEIGHT)
    mse(w), mm(w)
    e_mse = _sq_err(w, *mse.qparams(), bits, symmetric, gran)
    e_mm = _sq_err(w, *mm.qparams(), bits, symmetric, gran)
    dims = {PerTensor: None, PerChannel: 1}
    if isinstance(gran, GroupWise):
        e_mse, e_mm = group_view(e_mse, 4).sum(-1), group_view(e_mm, 4).sum(-1)
    elif dims[type(gran)] is not None:
        e_mse, e_mm = e_mse.sum(1), e_mm.sum(1)
    else:
        e_mse, e_mm = e_mse.sum(), e_mm.sum()
    assert (e_mse <= e_mm * (1 + 1e-4) + 1e-12).all(), (e_mse, e_mm)


@given(float_tensors(max_numel=200), st.integers(2, 8), st.booleans())
def test_mse_activation_never_worse_than_minmax(x, bits, symmetric):
    mse, mm = MSEObserver(bits, symmetric), MinMaxObserver(bits, symmetric)
    mse(x), mm(x)
    e = lambda o: _sq_err(x, *o.qparams(), bits, symmetric, PerTensor()).sum()  # noqa: E731
    assert e(mse) <= e(mm) * (1 + 1e-4) + 1e-12


def test_mse_clips_an_outlier():
    x = torch.cat([torch.linspace(-1, 1, 100001), torch.tensor([50.0])])  # clipping pays
    o = MSEObserver(4, True)
    o(x)
    s, _ = o.qparams()
    assert s.item() * 7 < 10  # range far below the outlier
    assert (o.ranges()[1] < 50).item()
    one = MSEObserver(4, True, candidates=1)
    one(x)
    assert one.ranges()[1].item() == 50.0  # a single candidate is the min-max range


def test_mse_search_asymmetric_stages():
    """Skewed data (GELU-like): the lower end stays, the upper end is clipped."""
    v = torch.cat([torch.full((2000,), -0.17), torch.linspace(0, 1, 20000), torch.tensor([10.0])])
    lo, hi = mse_search(v[None], v.min()[None], v.max()[None], 4, False, 100)
    # stage 1 alone shrinks both ends by hi/10 (lo ~ -0.02); stage 2 restores the lower end
    assert hi.item() < 5 and lo.item() < -0.1
    s1 = mse_search(v[None], v.min()[None], v.max()[None], 4, False, 100)
    assert torch.equal(s1[0], lo)  # deterministic


@pytest.mark.parametrize("shape", [(1, 5000), (37, 130), (300, 8)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_errors_blocked_equal_each_candidate_whole(monkeypatch, shape, symmetric):
    """The search's blocks (a slice of one long group, several groups, several candidates)
    add up to each candidate's fake-quant error over the whole group, and pick its argmin."""
    monkeypatch.setattr(search, "_CHUNK", 2**10)       # blocks split m, G and C here
    v = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.1
    v[:, ::7] *= 20
    a = torch.arange(1, 51, dtype=torch.float32)[:, None] / 50
    lo, hi = a * v.min(1).values, a * v.max(1).values       # [50, G]
    got = search._sq_errors(v, lo, hi, 4, symmetric)
    s, z = choose_qparams(lo[..., None], hi[..., None], 4, symmetric)
    want = (fake_quantize(v.expand(50, *shape), s, z, 4, symmetric) - v).double().square().sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert torch.equal(got.argmin(0), want.argmin(0))


def test_mse_accumulates_over_batches():
    o = MSEObserver(8, False)
    o(torch.tensor([0.0, 1.0]))
    o(torch.tensor([-4.0, 0.5]))
    assert (o.min_val.item(), o.max_val.item()) == (-4.0, 1.0)  # candidates span all batches
    assert o.sample.numel() == 4


def test_sample_memory_is_bounded_and_covers_all_batches():
    o = MSEObserver(8, True, max_samples=1000)
    for i in range(20):
        o(torch.full((4, 500), float(i)))
    assert o.sample.numel() == 1000 and o.keys.numel() == 1000
    counts = torch.bincount(o.sample.long(), minlength=20)
    assert (counts > 10).all(), counts  # uniform over batches, not the last ones
    p = MSEObserver(8, True, PerGroup(2), max_samples=64)
    for _ in range(3):
        p(torch.randn(5, 7, 16))
    assert p.sample.shape == (4, 16)  # whole rows, 64 // 16 of them


def _reservoir_by_topk(batches, cap, peg):
    """The reservoir as first written: concatenate, then topk of the smallest keys."""
    gen, sample, keys = torch.Generator().manual_seed(0), None, None
    for x in batches:
        units = x.reshape(-1, x.shape[-1]) if peg else x.reshape(-1)
        if units.shape[0] > cap:
            units = units[torch.randint(units.shape[0], (cap,), generator=gen)]
        k = torch.rand(units.shape[0], generator=gen)
        if sample is not None:
            units, k = torch.cat([sample, units]), torch.cat([keys, k])
        if units.shape[0] > cap:
            keep = k.topk(cap, largest=False).indices
            units, k = units[keep], k[keep]
        sample, keys = units, k
    return sample, keys


@pytest.mark.parametrize("sizes,peg", [((300, 300, 300, 700, 50, 1, 2000), False),
                                       ((500, 500, 200, 900), False),  # fills exactly
                                       ((40, 40, 40, 40, 40, 40), True)])
def test_reservoir_merge_equals_topk(sizes, peg):
    """The merge that replaced concat + topk keeps the same units in the same order."""
    torch.manual_seed(1)
    batches = [torch.randn(n, 10) if peg else torch.randn(n) for n in sizes]
    o = MSEObserver(8, True, PerGroup(2) if peg else PerTensor(), max_samples=1000)
    for b in batches:
        o(b)
    sample, keys = _reservoir_by_topk(batches, 100 if peg else 1000, peg)
    assert torch.equal(o.keys, keys) and torch.equal(o.sample, sample)


@pytest.mark.parametrize("peg", [False, True])
def test_reservoir_many_batches_equals_topk(peg):
    """Many batches after the reservoir fills (several pending merges), then a state
    dict taken halfway and loaded into a fresh observer: both end on the reference's
    units in its order (keys are 24-bit floats: equal keys may swap their units)."""
    torch.manual_seed(2)
    batches = [torch.randn(90, 10) if peg else torch.randn(900) for _ in range(40)]
    o = MSEObserver(8, True, PerGroup(2) if peg else PerTensor(), max_samples=1000)
    for b in batches[:20]:
        o(b)
    assert o._pending and o._bound is not None       # the deferred path ran
    half = {k: v.clone() for k, v in o.state_dict().items()}
    assert not o._pending and not o._unordered        # saving settled it
    for b in batches[20:]:
        o(b)
    sample, keys = _reservoir_by_topk(batches, 100 if peg else 1000, peg)
    assert torch.equal(o.keys, keys)
    same = o.sample == sample if not peg else (o.sample == sample).all(1)
    assert all(int((keys == k).sum()) > 1 for k in keys[~same].tolist())   # ties only
    r = MSEObserver(8, True, PerGroup(2) if peg else PerTensor(), max_samples=1000)
    r.load_state_dict(half)
    assert torch.equal(r.keys, half["keys"]) and torch.equal(r.sample, half["sample"])


# --- percentile -------------------------------------------------------------------------


def test_percentile():
    assert kth_percentile(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), 50).item() == 2.0
    x = torch.arange(1, 101, dtype=torch.float32)
    o = PercentileObserver(8, True, p=90)
    o(x), o(-x)
    assert o.ranges()[1].item() == 90.0
    a = PercentileObserver(8, False, p=100)
    a(x - 30)
    assert (a.ranges()[0].item(), a.ranges()[1].item()) == (-29.0, 70.0)
    w = PercentileObserver(4, True, PerChannel(), WEIGHT, p=99.0)
    w(torch.randn(5, 300))
    assert w.qparams()[0].shape == (5, 1)


# --- PEG ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [MinMaxObserver, RunningMinMaxObserver, MSEObserver,
                                 PercentileObserver])
def test_peg_permutation_uses_all_batches(cls):
    """Dim 1 is an outlier only in the first batch: it still sorts last."""
    b1, b2 = torch.randn(2, 5, 8) * 0.1, torch.randn(2, 5, 8) * 0.1
    b1[..., 1] = 40.0
    o = cls(8, False, PerGroup(4, permute=True), ACTIVATION)
    o(b1), o(b2)
    assert o.perm.dtype == torch.int64 and o.perm.shape == (8,) and o.perm[-1].item() == 1
    s, z = o.qparams()
    assert s.shape == z.shape == (8,)
    assert len(set(s.tolist())) <= 4  # constant within each of the 4 groups
    assert s[o.perm].reshape(4, 2).unique(dim=1).shape[1] == 1


def test_peg_without_permute_has_no_perm():
    o = MinMaxObserver(8, True, PerGroup(2))
    o(torch.randn(3, 4))
    assert o.perm is None and o.qparams()[0].shape == (4,)


@given(activations(d_choices=(4, 8)), st.booleans())
def test_peg_observer_matches_reduce_range_on_one_batch(x, symmetric):
    o = MinMaxObserver(8, symmetric, PerGroup(2, permute=True))
    o(x)
    ref = choose_qparams(*reduce_range(x, PerGroup(2, permute=True), ACTIVATION), 8, symmetric)
    assert torch.equal(o.qparams()[0], ref[0]) and torch.equal(o.qparams()[1], ref[1])


# --- 1 bit -------------------------------------------------------------------------------


def test_mean_abs_observer():
    w = torch.tensor([[1.0, -3.0], [0.0, 2.0]])
    o = make_observer(resolve(WEIGHT, TensorPatch(bits=1)))
    assert isinstance(o, MeanAbsObserver)
    o(w)
    assert torch.equal(o.qparams()[0], torch.tensor([[2.0], [1.0]]))
    a = make_observer(resolve(ACTIVATION, TensorPatch(bits=1, symmetric=True, observer=MSE())))
    a(torch.tensor([1.0, -1.0])), a(torch.tensor([3.0, 3.0]))
    assert a.qparams()[0].item() == pytest.approx(2.0)  # mean over all batches
    g = MeanAbsObserver(granularity=PerGroup(2, True), mode="latest")
    g(torch.tensor([[1.0, -8.0, 2.0, 8.0], [-1.0, 8.0, -2.0, -8.0]]))  # ranges 2, 16, 4, 16
    assert g.qparams()[0].tolist() == [1.5, 8.0, 1.5, 8.0]


# --- factory and state ------------------------------------------------------------------------


@pytest.mark.parametrize("observer, cls", [(MinMax(), MinMaxObserver),
                                           (RunningMinMax(0.5), RunningMinMaxObserver),
                                           (MSE(10), MSEObserver),
                                           (Percentile(99.9), PercentileObserver)])
def test_make_observer(observer, cls):
    o = make_observer(resolve(ACTIVATION, TensorPatch(bits=8, observer=observer)))
    assert type(o) is cls and o.bits == 8 and not o.symmetric


def test_make_observer_refuses_float_dynamic_and_wrong_kind():
    with pytest.raises(ValueError, match="float"):
        make_observer(resolve(WEIGHT, TensorPatch(bits=32)))
    with pytest.raises(ValueError, match="dynamic"):
        make_observer(resolve(ACTIVATION, TensorPatch(bits=8, granularity=PerToken())))
    with pytest.raises(ValueError, match="per_channel does not apply to activations"):
        MinMaxObserver(8, True, PerChannel(), ACTIVATION)


@pytest.mark.parametrize("observer", [MinMax(), RunningMinMax(0.8), MSE(16), Percentile(99.0)])
@pytest.mark.parametrize("gran", [PerTensor(), PerGroup(2, permute=True)])
@pytest.mark.parametrize("bits", [1, 4])
def test_state_round_trip_through_safetensors(observer, gran, bits):
    spec = resolve(ACTIVATION, TensorPatch(bits=bits, symmetric=True, granularity=gran,
                                           observer=observer))
    o = make_observer(spec)
    for _ in range(3):
        o(torch.randn(2, 3, 4))
    back = observer_from_json(o.to_json(), load(save(o.state_dict())))
    assert type(back) is type(o) and back.to_json() == o.to_json()
    for a, b in zip(o.qparams(), back.qparams()):
        assert torch.equal(a, b)
    if o.perm is not None:
        assert torch.equal(o.perm, back.perm)
