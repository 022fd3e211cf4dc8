"""Hypothesis strategies shared by the test suite, gathered in one place."""

from __future__ import annotations

from hypothesis import strategies as st  # noqa: F401

# --- language (recipes, selectors, specs) ----------------------------------

from qdsl.recipe import Rule, Selector  # noqa: E402
from qdsl.spec import (MSE, GroupWise, MinMax, Percentile, PerChannel, PerGroup,  # noqa: E402
                       PerTensor, PerToken, RunningMinMax, TensorPatch)

_IDENT = st.from_regex(r"[a-z_][a-z0-9_]{0,7}", fullmatch=True).filter(
    lambda s: s not in ("include", "set"))
_INDEX = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 5)), min_size=1, max_size=3).map(
    lambda parts: "[" + ",".join(f"{a}-{a + d}" if d else str(a) for a, d in parts) + "]")
_SEGMENT = st.one_of(_IDENT, st.just("*"), _INDEX, _IDENT.map(lambda s: s + "*"))
globs = st.lists(_SEGMENT, min_size=1, max_size=4).map(".".join)
selectors = st.one_of(
    st.builds(Selector, st.just("glob"), globs, st.booleans()),
    st.builds(Selector, st.just("module"), globs, st.booleans()),
    st.builds(Selector, st.just("op"), _IDENT, st.booleans()),
    st.builds(Selector, st.just("type"), st.sampled_from(["Linear", "Conv1D", "LayerNorm"]),
              st.booleans()),
    st.builds(Selector, st.just("re"), st.sampled_from([r"block\.\d+\.attn\..*", "ln_f|lm_head",
                                                        r"x\\y"]), st.booleans()),
)
_momentum = st.floats(0.0, 0.999, allow_nan=False).map(lambda x: round(x, 4))
observers = st.one_of(st.builds(MinMax), st.builds(RunningMinMax, _momentum),
                      st.builds(MSE, st.integers(1, 500)),
                      st.builds(Percentile, st.floats(0.01, 100.0).map(lambda x: round(x, 3))
                                .filter(lambda x: x > 0)))
_bits = st.one_of(st.integers(1, 16), st.just(32))


def tensor_patches(kind: str) -> st.SearchStrategy[TensorPatch]:
    """Valid patches for 'weight' or 'activation' (no contradictions)."""
    grans = [st.builds(PerTensor)] + ([st.builds(PerChannel), st.builds(GroupWise,
                                                                       st.integers(1, 512))]
                                      if kind == "weight" else
                                      [st.builds(PerToken), st.builds(PerGroup, st.integers(1, 64),
                                                                      st.booleans())])
    quantized = st.builds(
        TensorPatch, bits=st.none() | _bits, symmetric=st.none() | st.booleans(),
        granularity=st.none() | st.one_of(grans), observer=st.none() | observers,
        dynamic=st.none() | st.booleans() if kind == "activation" else st.none())
    floating = st.builds(TensorPatch, float_dtype=st.sampled_from(["fp16", "bf16", "fp32"]))
    ok = lambda p: not (isinstance(p.granularity, PerToken) and p.dynamic is False)  # noqa: E731
    return st.one_of(quantized, floating).filter(ok)


rules = st.one_of(
    st.builds(Rule, selectors, tensor_patches("weight"), tensor_patches("activation")),
    st.builds(Rule, selectors, skip=st.just(True)),
).filter(lambda r: r.skip or not (r.weight.is_empty() and r.activation.is_empty()))



# --- quantizer maths (tensors, ranges, bit widths) -------------------------

bit_widths = st.integers(min_value=1, max_value=16)
multibit_widths = st.integers(min_value=2, max_value=16)  # grids with a zero level
_VALUE = st.floats(-1.0, 1.0, allow_nan=False, allow_infinity=False, allow_subnormal=False,
                   width=32)
_MAGNITUDE = st.sampled_from([1e-3, 0.02, 1.0, 7.5, 300.0])  # weights .. outlier activations


@st.composite
def float_tensors(draw, shape=None, max_numel: int = 64):
    """float32 tensors of moderate magnitude; ``shape`` fixed, or 1-D of 1..max_numel."""
    import torch

    n = max_numel if shape is None else 1
    if shape is not None:
        for s in shape:
            n *= s
    values = draw(st.lists(_VALUE, min_size=1 if shape is None else n, max_size=n))
    t = torch.tensor(values, dtype=torch.float32) * draw(_MAGNITUDE)
    return t if shape is None else t.reshape(shape)


@st.composite
def ranges(draw):
    """A clipping range (lo, hi), lo <= hi, as two 0-d float32 tensors (may exclude 0)."""
    import torch

    scale = draw(_MAGNITUDE)
    a, b = sorted([draw(_VALUE) * scale, draw(_VALUE) * scale])
    return torch.tensor(a), torch.tensor(b)


@st.composite
def matrices(draw, max_rows: int = 6, max_cols: int = 12, col_multiple: int = 1):
    """Weights [out, in] with in a multiple of ``col_multiple``."""
    rows = draw(st.integers(1, max_rows))
    cols = col_multiple * draw(st.integers(1, max(1, max_cols // col_multiple)))
    return draw(float_tensors(shape=(rows, cols)))


@st.composite
def activations(draw, d_choices=(1, 2, 4, 6, 8, 12), max_tokens: int = 6):
    """Activations [B, T, d]; some hidden dims scaled up as outliers."""
    import torch

    d = draw(st.sampled_from(d_choices))
    b, t = draw(st.integers(1, 2)), draw(st.integers(1, max_tokens))
    x = draw(float_tensors(shape=(b, t, d)))
    gain = torch.tensor(draw(st.lists(st.sampled_from([1.0, 1.0, 10.0]), min_size=d, max_size=d)))
    return x * gain


# --- runtime (packed codes) -------------------------------------------------


@st.composite
def packed_codes(draw):
    """(unsigned codes [rows, n] as nested lists, bits) for pack_int / unpack_int."""
    bits = draw(st.sampled_from((1, 2, 4, 8)))
    rows, n = draw(st.integers(1, 4)), draw(st.integers(1, 37))
    vals = st.integers(0, 2**bits - 1)
    return draw(st.lists(st.lists(vals, min_size=n, max_size=n), min_size=rows,
                         max_size=rows)), bits
