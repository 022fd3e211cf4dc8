"""The handler table of ``lower_int8``: how each quantized weight op is lowered.

A ``Site`` (one named node's weight op, with its weight spec and its input's
activation spec) is looked up in ``HANDLERS`` by (op kind, ``weight_kind`` of the
weight spec, ``input_kind`` of the input spec): no isinstance ladder, and a
combination with no entry is the pass's located error or fallback (``why_not`` says
why). A handler builds the runtime module with its ``from_spec`` from the plan's specs
and ``freeze``'s integer codes; ``label`` is `qdsl explain --lower int8`'s `exec` text.
A new kernel is one ``@handler(op, weight kind, input kinds, label)`` builder here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, fx, nn

from ..config.spec import GroupWise, PerChannel, PerTensor, PerToken, TensorSpec
from ..graph.attrs import param
from ..graph.ops import WEIGHTED_ATEN_OPS as OPS
from ..quant.primitives import group_unview, group_view, quantize
from ..runtime import (Int8DynamicLinear, Int8Embedding, Int8StaticLinear,
                       Int8WeightOnlyLinear, PackedEmbedding, PackedLinear)
from ..runtime.binary import BinaryDynamicLinear
from ..runtime.packed import PACKED_WEIGHT_BITS, W4DynamicLinear
from .freeze import Frozen


@dataclass
class Site:
    """One named node's weight op, as the handlers see it."""

    name: str
    weight: TensorSpec                 # the plan's weight spec (quantized)
    op: fx.Node | None                 # aten op reading the weight (None: not found)
    kind: str                          # "linear" | "embedding" | the op's name
    input: TensorSpec | None = None    # producer's activation spec; None = float / unknown
    producer: str | None = None        # canonical name of the node feeding the op
    act: fx.Node | None = None         # the qdsl_act__ call_module on the way back, if any
    chain: list[fx.Node] = field(default_factory=list)  # view ops, op input first


# --------------------------------------------------------------------------- spec kinds
# A site is looked up by (op kind, weight spec kind, input spec kind) in HANDLERS.

def weight_kind(w: TensorSpec) -> str | None:
    """"w8" (8-bit symmetric, per channel / per tensor: int8 buffers), "packed" (1 / 2 /
    4-bit symmetric, per channel / group: packed buffers), None (no integer storage)."""
    if not w.symmetric:
        return None
    if w.bits == 8 and isinstance(w.granularity, (PerChannel, PerTensor)):
        return "w8"
    if w.bits in PACKED_WEIGHT_BITS and isinstance(w.granularity, (PerChannel, GroupWise)):
        return "packed"
    return None


def input_kind(s: Site) -> str:
    """"ids" (an embedding's), "float" (float, fp16/bf16 or more than 8 bits),
    "a8 static" (per tensor), "a8 dynamic" (per token / per tensor), "a8 other"
    (8 bits, another granularity), "low" (fewer than 8 bits)."""
    a = s.input
    if s.kind == "embedding":
        return "ids"
    if a is None or not a.quantized or a.bits > 8:
        return "float"
    if a.bits < 8:
        return "low"
    if not a.dynamic and isinstance(a.granularity, PerTensor):
        return "a8 static"
    if a.dynamic and isinstance(a.granularity, (PerToken, PerTensor)):
        return "a8 dynamic"
    return "a8 other"


# --------------------------------------------------------------------------- handlers

def _codes(gm: fx.GraphModule, s: Site, frozen: Frozen) -> tuple[Tensor, Tensor]:
    """(int32 codes [out, in], scale) of the op's quantized weight: freeze's codes. A
    frozen state without codes is an artifact's: on the meta device (``qdsl.load`` of a
    self-contained artifact) the codes are shapes only, the stored integers assigned
    afterwards; with a real source model (an artifact without a model config) they are
    the fake-quantized copy's codes (``quantize(dequantize(q)) == q``)."""
    scale, zp = frozen.weights[s.name]
    if s.name in frozen.codes:
        return frozen.codes[s.name], scale
    _, w_arg, _, in_out = OPS[str(s.op.target)]
    w = param(gm, s.op.args[w_arg].target).detach()
    w = w.t() if in_out else w                               # [out, in]
    if w.is_meta:
        return torch.empty(w.shape, dtype=torch.int32, device="meta"), scale
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


@dataclass(frozen=True)
class Handler:
    """How one (op, weight kind, input kind) is lowered: ``build(gm, site, frozen)`` makes
    the runtime module from the site's specs and frozen codes; ``label`` is explain's
    `exec` text; ``feed_float``: the module is fed the producer's float output (it
    quantizes its input itself)."""

    label: str
    build: Callable[[fx.GraphModule, Site, Frozen], nn.Module]
    feed_float: bool


# (op kind, weight kind, input kind) -> Handler; no entry = fallback (error or simulate)
HANDLERS: dict[tuple[str, str, str], Handler] = {}


def handler(op: str, weight: str, inputs: tuple[str, ...], label: str, feed_float: bool = False):
    """Register the decorated builder for ``op`` with a ``weight``-kind weight and each of
    ``inputs`` (input kinds); one handler per key."""
    def register(build):
        for i in inputs:
            assert (op, weight, i) not in HANDLERS, (op, weight, i)
            HANDLERS[op, weight, i] = Handler(label, build, feed_float)
        return build
    return register


A8_ANY = ("a8 static", "a8 dynamic", "a8 other")


# embedding(W8, ids) -> Int8Embedding(ids): int8 rows, per-row scale, dequantized on lookup
@handler("embedding", "w8", ("ids",), "int8 rows")
def _int8_embedding(gm, s, frozen):
    return Int8Embedding.from_spec(s.weight, *_codes(gm, s, frozen))


# embedding(W4|W2|W1, ids) -> PackedEmbedding(ids): packed rows, unpacked on lookup
@handler("embedding", "packed", ("ids",), "packed w{bits}")
def _packed_embedding(gm, s, frozen):
    return PackedEmbedding.from_spec(s.weight, *_codes(gm, s, frozen))


# linear(Qstatic8(x), W8, b) -> Int8StaticLinear(x): int8 x int8 -> int32, frozen input scale/zp
@handler("linear", "w8", ("a8 static",), "int8 gemm (static)", feed_float=True)
def _static(gm, s, frozen):
    fq = gm.get_submodule(s.act.target)                      # FakeQuant: 0-d scale / zp
    return Int8StaticLinear.from_spec(s.weight, *_codes(gm, s, frozen), _bias(gm, s),
                                      act_spec=s.input, act_scale=fq.scale,
                                      act_zero_point=fq.zero_point)


# linear(Qdynamic8(x), W8, b) -> Int8DynamicLinear(x): per-token/tensor scales at run time
@handler("linear", "w8", ("a8 dynamic",), "int8 gemm (dynamic)", feed_float=True)
def _dynamic(gm, s, frozen):
    return Int8DynamicLinear.from_spec(s.weight, *_codes(gm, s, frozen), _bias(gm, s),
                                       act_spec=s.input)


# linear(x, W8, b), x float / fp16 / >8-bit -> Int8WeightOnlyLinear(x): bf16 GEMM, scale after
@handler("linear", "w8", ("float",), "int8 weight-only")
def _weight_only(gm, s, frozen):
    return Int8WeightOnlyLinear.from_spec(s.weight, *_codes(gm, s, frozen), _bias(gm, s))


# linear(x, W4|W2|W1, b), x float or 8-bit (its quantizer stays) -> PackedLinear(x)
@handler("linear", "packed", ("float",) + A8_ANY, "packed w{bits}")
def _packed_linear(gm, s, frozen):
    return PackedLinear.from_spec(s.weight, *_codes(gm, s, frozen), _bias(gm, s))


# linear(Qdynamic8(x), W1, b) -> BinaryDynamicLinear(x): XTC's 1W8A, x quantized in the
# 1-bit kernel (looked up before the "packed" row for 1-bit weights: see decide)
@handler("linear", "w1", ("a8 dynamic",), "1-bit sign-select (a8 dynamic)", feed_float=True)
def _binary_dynamic(gm, s, frozen):
    return BinaryDynamicLinear.from_spec(s.weight, *_codes(gm, s, frozen), _bias(gm, s),
                                         act_spec=s.input)


# linear(Qdynamic8(x), W4, b) -> W4DynamicLinear(x): w4a8, x quantized in the kernel, 4-bit
# x 8-bit codes summed in int32 per group (looked up before the "packed" row: see decide)
@handler("linear", "w4", ("a8 dynamic",), "int4 x int8 dot per group (a8 dynamic)",
         feed_float=True)
def _w4_dynamic(gm, s, frozen):
    return W4DynamicLinear.from_spec(s.weight, *_codes(gm, s, frozen), _bias(gm, s),
                                     act_spec=s.input)


SIMULATED, FLOAT, FUSED = "simulated (fake-quant)", "float", "float (fused attention)"


def why_not(s: Site) -> str:
    """Why no handler lowers ``s`` (for the error / fallback report)."""
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
    return f"no integer kernel is registered for {w.describe()}"


def decide(s: Site) -> Handler | None:
    """The registered handler of ``s``'s (op kind, weight kind, input kind), or None."""
    w = weight_kind(s.weight)
    if w is None:
        return None
    if w == "packed" and s.weight.bits in (1, 4):   # a 1- / 4-bit row first, then "packed"
        hit = HANDLERS.get((s.kind, f"w{s.weight.bits}", input_kind(s)))
        if hit is not None:
            return hit
    return HANDLERS.get((s.kind, w, input_kind(s)))


def _label(row: Handler, s: Site) -> str:
    return row.label.format(bits=s.weight.bits)
