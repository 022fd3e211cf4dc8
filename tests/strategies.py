"""Hypothesis strategies shared by the test suite, gathered in one place."""

from __future__ import annotations

import re
from dataclasses import replace

from hypothesis import strategies as st  # noqa: F401

# --- language (recipes, selectors, specs) ----------------------------------

from qdsl.config.rounding import AWQ, GPTQ, RTN  # noqa: E402
from qdsl.config.recipe import Rule, Selector  # noqa: E402
from qdsl.config.spec import (MSE, GroupWise, MinMax, Percentile, PerChannel, PerGroup, PerTensor,
                              PerToken, RunningMinMax, TensorPatch)

_IDENT = st.from_regex(r"[a-z_][a-z0-9_]{0,7}", fullmatch=True).filter(
    lambda s: s not in ("include", "set", "input", "smooth", "rotate"))  # keywords, the port
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
roundings = st.one_of(
    st.builds(GPTQ, st.floats(1e-4, 1.0).map(lambda x: round(x, 4)).filter(lambda x: x > 0),
              st.integers(1, 512), st.booleans()),
    st.builds(AWQ, st.integers(1, 1000), st.booleans()), st.builds(RTN))


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
        dynamic=st.none() | st.booleans() if kind == "activation" else st.none(),
        rounding=st.none() | roundings if kind == "weight" else st.none())
    floating = st.builds(TensorPatch, float_dtype=st.sampled_from(["fp16", "bf16", "fp32"]))
    ok = lambda p: not (isinstance(p.granularity, PerToken) and p.dynamic is False  # noqa: E731
                        or p.rounding is not None and p.bits == 32)  # float: refused
    return st.one_of(quantized, floating).filter(ok)


# `.input` selectors: the input activation of the matched linears (activation options only)
port_selectors = selectors.map(lambda s: replace(s, port="input"))
rules = st.one_of(
    st.builds(Rule, selectors, tensor_patches("weight"), tensor_patches("activation")),
    st.builds(Rule, selectors, skip=st.just(True)),
    st.builds(Rule, port_selectors, st.just(TensorPatch()), tensor_patches("activation")),
    st.builds(Rule, port_selectors, skip=st.just(True)),
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


# --- planner (synthetic named graphs; rules over their names) ----------------
# A NamedGraph without a model: blocks of canonical parts plus top-level nodes, some
# with random names. Selectors come with ``ref_selects``, their meaning written out
# here independently of qdsl.graph.select.

_PARTS = (("ln_1", "norm", "layer_norm"), ("attn.qkv", "linear", "linear"),
          ("attn.scores", "attn_scores", "matmul"), ("attn.probs", "softmax", "softmax"),
          ("attn.out", "linear", "linear"), ("res_attn", "residual_add", "add"),
          ("mlp.c_fc", "linear", "linear"), ("mlp.act", "act_fn", "gelu"),
          ("mlp.c_proj", "linear", "linear"), ("res_sum", "residual_add", "add"))
_TOPS = (("embed", "embedding", "embedding"), ("ln_f", "norm", "layer_norm"),
         ("lm_head", "linear", "linear"))
_WEIGHTED_ROLES = ("linear", "embedding")
_MAX_BLOCKS = 4


def _part(name: str, weighted: bool) -> tuple[str, str, str]:
    return (name, "linear", "linear") if weighted else (name, "act_fn", "gelu")


@st.composite
def named_graphs(draw):
    """A qdsl.graph.naming.NamedGraph of 1..4 blocks: block.N.<part> for a few parts (GPT-2's
    and random identifiers), then some top-level nodes; linears and embeddings have
    weights."""
    from qdsl.graph.naming import NamedGraph, NamedNode

    taken = {p[0] for p in _PARTS + _TOPS}
    fresh = draw(st.lists(st.tuples(_IDENT.filter(lambda s: s not in taken), st.booleans()),
                          max_size=4, unique_by=lambda t: t[0]))
    pool = list(_PARTS) + [_part(n, w) for n, w in fresh[:2]]
    parts = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=6,
                          unique_by=lambda p: p[0]))
    tops = draw(st.lists(st.sampled_from(list(_TOPS) + [_part(n, w) for n, w in fresh[2:]]),
                         max_size=4, unique_by=lambda p: p[0]))
    blocks = draw(st.integers(1, _MAX_BLOCKS))
    layout = [(f"block.{b}.{name}", b, role, op) for b in range(blocks)
              for name, role, op in parts] + [(name, None, role, op) for name, role, op in tops]
    nodes = tuple(NamedNode(
        name=name, role=role, block=b, module=f"m.{name}",
        module_type="Linear" if role in _WEIGHTED_ROLES else "Block", op=op, node=f"n{i}",
        weight=f"m.{name}.weight" if role in _WEIGHTED_ROLES else None)
        for i, (name, b, role, op) in enumerate(layout))
    return NamedGraph(nodes=nodes, by_name={n.name: n for n in nodes}, graph_hash="g",
                      module_map={n.name: n.module for n in nodes}, blocks=blocks)


def _local(name: str) -> tuple[int, str] | None:
    """'block.3.mlp.c_fc' -> (3, 'mlp.c_fc'); None outside blocks."""
    head, _, rest = name.partition(".")
    index, _, local = rest.partition(".")
    return (int(index), local) if head == "block" and index.isdigit() and local else None


def ref_selects(sel: Selector, node) -> bool:
    """What the selectors ``planner_selectors`` draws mean: ``op:OP`` that op; ``*`` every
    node; ``block.*.P`` / ``block.[i-j].P`` part P of every block / of blocks i..j; any
    other pattern a whole name, or a part of every block."""
    if sel.kind == "op":
        return node.op == sel.pattern
    assert sel.kind == "glob", sel
    if sel.pattern == "*":
        return True
    where = _local(node.name)
    m = re.fullmatch(r"block\.(\*|\[(\d+)(?:-(\d+))?\])\.(.+)", sel.pattern)
    if m:
        star, lo, hi, part = m.groups()
        return where is not None and where[1] == part and (
            star == "*" or int(lo) <= where[0] <= int(hi or lo))
    return node.name == sel.pattern or (where is not None and where[1] == sel.pattern)


@st.composite
def planner_selectors(draw, named) -> Selector:
    """Selectors over ``named``: exact names, bare parts, ``*``, ``block.*.P``,
    ``block.[i-j].P``, ``op:OP``, and names the graph does not have; each maybe optional."""
    names = [n.name for n in named.nodes]
    parts = sorted({_local(n)[1] for n in names if _local(n)}) or ["mlp.c_fc"]
    pick = lambda xs: xs[draw(st.integers(0, len(xs) - 1))]  # noqa: E731
    form = draw(st.integers(0, 7))
    if form == 0:
        sel = Selector("op", pick(sorted({n.op for n in named.nodes}) + ["softmax"]))
    elif form in (1, 2):
        sel = Selector("glob", pick(names))
    elif form == 3:
        sel = Selector("glob", pick(parts))
    elif form == 4:
        sel = Selector("glob", "*")
    elif form == 5:
        sel = Selector("glob", f"block.*.{pick(parts)}")
    elif form == 6:
        lo, width = draw(st.integers(0, _MAX_BLOCKS - 1)), draw(st.integers(0, 3))
        blocks = f"[{lo}]" if width == 0 else f"[{lo}-{lo + width}]"
        sel = Selector("glob", f"block.{blocks}.{pick(parts)}")
    else:
        sel = Selector("glob", pick([p for p, _, _ in _PARTS + _TOPS] + ["block.9.ln_1",
                                                                         "nothere"]))
    return replace(sel, optional=draw(st.booleans()))


_EMPTY = st.just(TensorPatch())
# no gptq / awq here: whether they fit depends on the whole cascade, which the reference
# planner below does not model (tests/passes/test_round_weights.py tests those errors)
_QUANT_PATCHES = st.tuples(tensor_patches("weight").map(lambda p: replace(p, rounding=None)) | _EMPTY,
                           tensor_patches("activation") | _EMPTY).filter(
    lambda wa: not (wa[0].is_empty() and wa[1].is_empty()))
_PATCHES_OR_SKIP = st.one_of(_QUANT_PATCHES, _QUANT_PATCHES, _QUANT_PATCHES, st.just("skip"))


@st.composite
def planner_rules(draw, named) -> Rule:
    """One rule over ``named``: weight and/or activation patches as the language writes
    them (tensor_patches), or (one in four) ``skip``."""
    sel = draw(planner_selectors(named))
    body = draw(_PATCHES_OR_SKIP)
    return Rule(sel, skip=True) if body == "skip" else Rule(sel, *body)


def plannable(rule: Rule, named) -> Rule:
    """``rule`` changed as little as needed for the planner to accept it: optional when
    it selects nothing; no weight options when none of its nodes has weights."""
    hits = [n for n in named.nodes if ref_selects(rule.selector, n)]
    if not hits:
        rule = replace(rule, selector=replace(rule.selector, optional=True))
    if not rule.skip and not rule.weight.is_empty() and not any(n.has_weight for n in hits):
        rule = replace(rule, weight=TensorPatch(),
                       activation=rule.activation if not rule.activation.is_empty()
                       else TensorPatch(bits=8))
    return rule


@st.composite
def graphs_and_rules(draw, plannable_only: bool = False, max_rules: int = 8):
    """(named graph, rule list) over it; ``plannable_only``: a list the planner accepts."""
    named = draw(named_graphs())
    rules = draw(st.lists(planner_rules(named), min_size=1, max_size=max_rules))
    if plannable_only:
        rules = [plannable(r, named) for r in rules]
    return named, rules
