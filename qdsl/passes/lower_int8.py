"""Pass: real low-bit lowering. Replace each quantized linear / embedding op of a
fake-quant graph by a runtime module (``qdsl.runtime``) holding integer weights.

requires: ``lower_fake`` ran with ``frozen`` (each quantized weight is a
          fake-quantized copy at ``qdsl_weight__<name>``; activation modules sit
          at ``qdsl_act__<name>`` on named nodes' outputs).
ensures:  every op a row below matches is a ``call_module`` of a runtime module
          (``qdsl_int8__<name>``); the fake weight copies, biases and activation
          modules no node reads any more are gone from the graph module;
          everything else (activation quantizers at non-linear nodes, ops no row
          matches under ``fallback="simulate"``) stays fake-quant. The pipeline
          (``qdsl.passes.pipeline.INT8``) runs ``fuse_attention`` next: attentions
          whose scores and probs stay float become one fused SDPA call.

Integer codes are the ones ``freeze`` computed (``frozen.codes``), used as they are.
A frozen state without codes (an artifact's, on meta tensors: ``qdsl.load``) gets
``quantize(w_hat, scale, zero_point)`` of the fake-quantized copy: there the pass
only builds structure, and the stored integers are assigned afterwards.

The input quantizer of a linear is its producer's activation quantizer, found by
walking back from the op's input through view-like ops: a static 8-bit per-tensor
FakeQuant gives its frozen scale to ``Int8StaticLinear``, a dynamic 8-bit one
makes it ``Int8DynamicLinear``; both are fed the producer's float output (the
quantizer stays for other consumers). Float, fp16/bf16 or >8-bit inputs get
weight-only modules fed exactly what the fake-quant graph fed the op.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import Tensor, fx, nn

from ..errors import GraphError
from ..graph.attrs import owner, param
from ..graph.ops import LINEAR_INPUT_VIEWS, WEIGHTED_ATEN_OPS
from ..plan import QuantPlan
from ..quant.primitives import group_unview, group_view, quantize
from ..runtime import (Int8DynamicLinear, Int8Embedding, Int8StaticLinear,
                       Int8WeightOnlyLinear, PackedEmbedding, PackedLinear)
from ..config.spec import GroupWise, PerChannel, PerTensor, PerToken, TensorSpec
from .common import ACT_PREFIX, attr_name, weight_use
from .freeze import Frozen

INT8_PREFIX = "qdsl_int8__"
FALLBACKS = ("error", "simulate")
# ops between a quantizer and the linear that reads it (GPT-2 Conv1D: view(x, [-1, d]));
# op -> (input arg, weight arg, bias arg, weight stored [in, out]?): the op tables
VIEW_OPS, OPS = LINEAR_INPUT_VIEWS, WEIGHTED_ATEN_OPS


@dataclass
class Site:
    """One named node's weight op, as the rewrite rows see it."""

    name: str
    weight: TensorSpec                 # the plan's weight spec (quantized)
    op: fx.Node | None                 # aten op reading the weight (None: not found)
    kind: str                          # "linear" | "embedding" | the op's name
    input: TensorSpec | None = None    # producer's activation spec; None = float / unknown
    producer: str | None = None        # canonical name of the node feeding the op
    act: fx.Node | None = None         # the qdsl_act__ call_module on the way back, if any
    chain: list[fx.Node] = field(default_factory=list)  # view ops, op input first


# --------------------------------------------------------------------------- predicates

def _w8(s: Site) -> bool:
    w = s.weight
    return w.bits == 8 and w.symmetric and isinstance(w.granularity, (PerChannel, PerTensor))


def _packed(s: Site) -> bool:
    w = s.weight
    g = w.granularity
    return w.bits in (1, 2, 4) and w.symmetric and isinstance(g, (PerChannel, GroupWise))


def _a_float(s: Site) -> bool:  # float, fp16/bf16, or more than 8 bits: weight-only
    return s.input is None or not s.input.quantized or s.input.bits > 8


def _a8_static(s: Site) -> bool:
    a = s.input
    return a is not None and a.bits == 8 and not a.dynamic and isinstance(a.granularity, PerTensor)


def _a8_dynamic(s: Site) -> bool:
    a = s.input
    return (a is not None and a.bits == 8 and a.dynamic
            and isinstance(a.granularity, (PerToken, PerTensor)))


# --------------------------------------------------------------------------- builders

def _codes(gm: fx.GraphModule, s: Site, frozen: Frozen) -> tuple[Tensor, Tensor]:
    """(int32 codes [out, in], scale) of the op's quantized weight: freeze's codes, or
    (no codes: an artifact's frozen state) the fake-quantized copy's."""
    scale, zp = frozen.weights[s.name]
    if s.name in frozen.codes:
        return frozen.codes[s.name], scale
    _, w_arg, _, in_out = OPS[str(s.op.target)]
    w = param(gm, s.op.args[w_arg].target).detach()
    w = w.t() if in_out else w                               # [out, in]
    if isinstance(s.weight.granularity, GroupWise):          # scale: [out, in/size, 1]
        q = group_unview(quantize(group_view(w.float(), s.weight.granularity.size),
                                  scale, zp, s.weight.bits, True))
    else:                                                    # scale: [out, 1] or 0-d
        q = quantize(w.float(), scale, zp, s.weight.bits, True)
    return q, scale


def _bias(gm: fx.GraphModule, s: Site) -> Tensor | None:
    b_arg = OPS[str(s.op.target)][2]
    if b_arg is None or len(s.op.args) <= b_arg or not isinstance(s.op.args[b_arg], fx.Node):
        return None
    return param(gm, s.op.args[b_arg].target)


def _group(s: Site) -> int | None:
    g = s.weight.granularity
    return g.size if isinstance(g, GroupWise) else None


def _static(gm, s, frozen):
    fq = gm.get_submodule(s.act.target)                      # FakeQuant: 0-d scale / zp
    q, scale = _codes(gm, s, frozen)
    return Int8StaticLinear.from_int(q, scale, _bias(gm, s), fq.scale, fq.zero_point,
                                     act_symmetric=s.input.symmetric)


def _dynamic(gm, s, frozen):
    q, scale = _codes(gm, s, frozen)
    return Int8DynamicLinear.from_int(q, scale, _bias(gm, s),
                                      act_granularity=s.input.granularity,
                                      act_symmetric=s.input.symmetric)


def _weight_only(gm, s, frozen):
    return Int8WeightOnlyLinear.from_int(*_codes(gm, s, frozen), _bias(gm, s))


def _packed_linear(gm, s, frozen):
    return PackedLinear.from_int(*_codes(gm, s, frozen), _bias(gm, s), s.weight.bits, _group(s))


def _int8_embedding(gm, s, frozen):
    return Int8Embedding.from_int(*_codes(gm, s, frozen))


def _packed_embedding(gm, s, frozen):
    return PackedEmbedding.from_int(*_codes(gm, s, frozen), s.weight.bits, _group(s))


@dataclass(frozen=True)
class Row:
    label: str
    pattern: Callable[[Site], bool]
    build: Callable[[fx.GraphModule, Site, Frozen], nn.Module]
    feed_float: bool  # True: feed the producer's float output (the module quantizes itself)


# The rewrite table: first matching row wins; no row = fallback (error or simulate).
ROWS = (
    # embedding(W8, ids) -> Int8Embedding(ids): int8 rows, per-row scale, dequantized on lookup
    Row("int8 rows", lambda s: s.kind == "embedding" and _w8(s), _int8_embedding, False),
    # embedding(W4|W2|W1, ids) -> PackedEmbedding(ids): packed rows, unpacked on lookup
    Row("packed w{bits}", lambda s: s.kind == "embedding" and _packed(s), _packed_embedding, False),
    # linear(Qstatic8(x), W8, b) -> Int8StaticLinear(x): int8 x int8 -> int32, frozen input scale/zp
    Row("int8 gemm (static)", lambda s: s.kind == "linear" and _w8(s) and _a8_static(s),
        _static, True),
    # linear(Qdynamic8(x), W8, b) -> Int8DynamicLinear(x): per-token/tensor scales at run time
    Row("int8 gemm (dynamic)", lambda s: s.kind == "linear" and _w8(s) and _a8_dynamic(s),
        _dynamic, True),
    # linear(x, W8, b), x float / fp16 / >8-bit -> Int8WeightOnlyLinear(x): bf16 GEMM, scale after
    Row("int8 weight-only", lambda s: s.kind == "linear" and _w8(s) and _a_float(s),
        _weight_only, False),
    # linear(x, W4|W2|W1, b), x float or >=8-bit (its quantizer stays) -> PackedLinear(x)
    Row("packed w{bits}", lambda s: s.kind == "linear" and _packed(s)
        and (_a_float(s) or s.input.bits == 8), _packed_linear, False),
)
SIMULATED, FLOAT, FUSED = "simulated (fake-quant)", "float", "float (fused attention)"


def why_not(s: Site) -> str:
    """Why no row lowers ``s`` (for the error / fallback report)."""
    w, a = s.weight, s.input
    if s.op is None or s.kind not in ("linear", "embedding"):
        return f"its weight is read by {s.kind}, which has no integer kernel"
    if not w.symmetric:
        return f"asymmetric weights ({w.describe()}) have no integer kernel"
    if w.bits not in (1, 2, 4, 8):
        return f"{w.bits}-bit weights cannot be stored packed (1, 2, 4 or 8 bits)"
    if w.bits == 8 and isinstance(w.granularity, GroupWise):
        return "group-wise int8 weights have no integer kernel (use per_channel)"
    if a is not None and a.quantized and a.bits < 8:
        return f"its input is quantized to {a.bits} bits ({a.describe()}); kernels take a8"
    if a is not None and a.quantized:
        return f"input quantizer {a.describe()} has no integer kernel (a8 per_tensor / per_token)"
    return f"no rewrite row for {w.describe()}"


# --------------------------------------------------------------------------- matching

def _sites(gm: fx.GraphModule, named, plan: QuantPlan) -> list[Site]:
    """A Site for every named node with a quantized weight, in graph order."""
    by_fx = {n.node: n.name for n in named.nodes}
    sites = []
    for node in named.nodes:
        spec = plan[node.name].weight
        if spec is None or not spec.quantized:
            continue
        try:
            op, _ = _weight_op(gm, node, weight_use)
        except GraphError:
            sites.append(Site(node.name, spec, None, "unknown op"))
            continue
        target = str(op.target)
        kind = ("embedding" if target == "aten.embedding.default"
                else "linear" if target in OPS else target)
        s = Site(node.name, spec, op, kind)
        if kind == "linear":
            _find_input(s, by_fx, plan)
        sites.append(s)
    return sites


def weight_sites(gm: fx.GraphModule, named, plan: QuantPlan) -> list[Site]:
    """Every quantized weight's op, kind and input spec (``qdsl train`` simulates these)."""
    return _sites(gm, named, plan)


def _weight_op(gm, node, weight_use):
    """The op reading the node's weight: after lower_fake it reads ``qdsl_weight__<name>``."""
    fake = attr_name(node.name, "qdsl_weight__")
    if hasattr(gm, fake):
        return weight_use(gm, replace(node, weight=fake))
    return weight_use(gm, node)


def _find_input(s: Site, by_fx: dict[str, str], plan: QuantPlan) -> None:
    """Walk back from the op's input through view ops to a quantizer or a named node."""
    x = s.op.args[OPS[str(s.op.target)][0]]
    while isinstance(x, fx.Node):
        if x.op == "call_module" and str(x.target).startswith(ACT_PREFIX):
            s.act, s.producer = x, x.meta.get("qdsl")
            break
        if x.name in by_fx:
            s.producer = by_fx[x.name]
            break
        if x.op != "call_function" or str(x.target) not in VIEW_OPS:
            return
        s.chain.append(x)
        x = x.args[0]
    if s.producer is not None:
        s.input = plan[s.producer].activation


def decide(s: Site) -> Row | None:
    return next((r for r in ROWS if r.pattern(s)), None)


def _label(row: Row, s: Site) -> str:
    return row.label.format(bits=s.weight.bits)


# --------------------------------------------------------------------------- the pass

@torch.no_grad()
def lower_int8(gm: fx.GraphModule, named, plan: QuantPlan, frozen: Frozen, *,
               fallback: str = "error", compute: str | None = None) -> fx.GraphModule:
    """Apply the rewrite table. ``fallback``: "error" raises GraphError at the first op no
    row lowers; "simulate" leaves it fake-quant, warns, and lists it in
    ``gm.meta["qdsl_fallbacks"]`` ([{"node", "reason"}]). ``compute`` (the recipe's
    ``lower.compute``): weight-only modules compute in "bf16" (fast kernels, the
    default) or "fp32" (exact, slow)."""
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    fallbacks, shared = [], {}
    for s in _sites(gm, named, plan):
        row = decide(s)
        if row is None:
            reason = why_not(s)
            if fallback == "error":
                raise GraphError(f"--lower int8 cannot run {s.name}: {reason}", node=s.name,
                                 hint="pass --fallback simulate to keep it as fake-quant "
                                      "simulation, or change the recipe")
            warnings.warn(f"lower int8: {s.name} stays simulated (fake-quant): {reason}",
                          stacklevel=2)
            fallbacks.append({"node": s.name, "reason": reason})
            continue
        module = row.build(gm, s, frozen)
        if compute and hasattr(module, "compute_dtype"):
            module.compute_dtype = compute
        _share_tied(module, s, named, shared)
        _replace(gm, s, row, module)
    _drop_unread(gm)
    gm.graph.lint()
    gm.recompile()
    gm.meta["qdsl_fallbacks"] = fallbacks
    return gm


def _drop_unread(gm: fx.GraphModule) -> None:
    """Delete parameters / buffers no node reads (a tied weight's other alias, e.g.
    GPT-2's ``transformer.wte.weight`` once embed and lm_head hold int8 codes)."""
    for n in [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]:
        gm.graph.erase_node(n)
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    modules = [n.target + "." for n in gm.graph.nodes if n.op == "call_module"]
    names = [k for k, _ in gm.named_parameters(remove_duplicate=False)]
    names += [k for k, _ in gm.named_buffers(remove_duplicate=False)]
    for k in names:
        if k not in read and not any(k.startswith(m) for m in modules):
            _delattr(gm, k)


def _share_tied(module: nn.Module, s: Site, named, shared: dict) -> None:
    """Tied embed / lm_head with the same spec and scales: one set of integer buffers."""
    names = ("weight_packed", "weight_scale") if hasattr(module, "weight_packed") \
        else ("weight", "weight_scale")
    key = (named[s.name].weight, repr(s.weight), names)
    first = shared.get(key)
    if first is None:
        shared[key] = module
        return
    same = all(getattr(first, n).shape == getattr(module, n).shape for n in names) and (
        module.weight_scale.is_meta or torch.equal(first.weight_scale, module.weight_scale))
    if same:
        for n in names:
            setattr(module, n, getattr(first, n))


def _replace(gm: fx.GraphModule, s: Site, row: Row, module: nn.Module) -> None:
    """op(x, W, b) -> call_module(module, x'); x' = the producer's float output or x."""
    attr = attr_name(s.name, INT8_PREFIX)
    gm.add_submodule(attr, module)
    x = s.op.args[OPS[str(s.op.target)][0]]
    with gm.graph.inserting_before(s.op):
        if row.feed_float and s.act is not None:             # rebuild the views on act's input
            x = s.act.args[0]
            for v in reversed(s.chain):
                x = gm.graph.node_copy(v, lambda a, v=v, x=x: x if a is v.args[0] else a)
        new = gm.graph.call_module(attr, (x,))
    keep = ("val", "tensor_meta", "nn_module_stack")
    new.meta = {k: v for k, v in s.op.meta.items() if k in keep}
    new.meta["qdsl"] = s.name
    old_inputs = list(s.op.all_input_nodes)
    s.op.replace_all_uses_with(new)
    gm.graph.erase_node(s.op)
    _drop_unused(gm, old_inputs + ([s.act] if s.act is not None else []) + s.chain)


def _drop_unused(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Erase get_attr / view / quantizer nodes nobody reads, and free what they held."""
    for n in nodes:
        if n.users or getattr(n, "_erased", False) or n.op not in ("get_attr", "call_module",
                                                                   "call_function"):
            continue
        if n.op == "call_function" and str(n.target) not in VIEW_OPS:
            continue
        inputs = list(n.all_input_nodes)
        target = n.target
        gm.graph.erase_node(n)
        if n.op == "get_attr" and not any(u.op == "get_attr" and u.target == target
                                          for u in gm.graph.nodes):
            _delattr(gm, target)
        elif n.op == "call_module" and not any(u.op == "call_module" and u.target == target
                                               for u in gm.graph.nodes):
            _delattr(gm, target)
        _drop_unused(gm, inputs)


def _delattr(gm: fx.GraphModule, target: str) -> None:
    module, name = owner(gm, target)
    if hasattr(module, name):
        delattr(module, name)
