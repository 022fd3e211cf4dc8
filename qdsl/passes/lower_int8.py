"""Pass: real low-bit lowering. Replace each quantized linear / embedding op of a
fake-quant graph by a runtime module (``qdsl.runtime``) holding integer weights.

requires: ``lower_fake`` ran with ``frozen`` (each quantized weight is a
          fake-quantized copy at ``qdsl_weight__<name>``; activation modules sit
          at ``qdsl_act__<name>`` on named nodes' outputs).
ensures:  every op a registered handler lowers is a ``call_module`` of a runtime module
          (``qdsl_int8__<name>``); the fake weight copies, biases and activation
          modules no node reads any more are gone from the graph module;
          everything else (activation quantizers at non-linear nodes, ops no handler
          matches under ``fallback="simulate"``) stays fake-quant. The pipeline
          (``qdsl.passes.pipeline.INT8``) runs ``fuse_attention`` next: attentions
          whose scores and probs stay float become one fused SDPA call.

Each site is looked up in ``HANDLERS`` (``passes.int8_handlers``) by (op kind,
``weight_kind`` of its weight spec, ``input_kind`` of its input spec); a handler builds the runtime module with
its ``from_spec`` from the plan's specs and the integer codes ``freeze`` computed
(``frozen.codes``), used as they are. A frozen state without codes is an artifact's
(``qdsl.load``): on meta tensors the pass only builds structure (codes are shapes),
and the stored integers are assigned afterwards, never re-derived.

The input quantizer of a linear is its producer's activation quantizer, found by
walking back from the op's input through view-like ops: a static 8-bit per-tensor
FakeQuant gives its frozen scale to ``Int8StaticLinear``, a dynamic 8-bit one
makes it ``Int8DynamicLinear``; both are fed the producer's float output (the
quantizer stays for other consumers). Float, fp16/bf16 or >8-bit inputs get
weight-only modules fed exactly what the fake-quant graph fed the op.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch
from torch import fx, nn

from ..errors import GraphError
from ..graph.attrs import owner
from ..graph.ops import LINEAR_INPUT_VIEWS, WEIGHTED_ATEN_OPS
from ..plan import QuantPlan
from .common import ACT_PREFIX, attr_name, weight_use
from .freeze import Frozen
from .int8_handlers import (FLOAT, FUSED, HANDLERS, SIMULATED, Handler, Site,  # noqa: F401
                            _label, decide, why_not)

INT8_PREFIX = "qdsl_int8__"
FALLBACKS = ("error", "simulate")
# ops between a quantizer and the linear that reads it (GPT-2 Conv1D: view(x, [-1, d]));
# op -> (input arg, weight arg, bias arg, weight stored [in, out]?): the op tables
VIEW_OPS, OPS = LINEAR_INPUT_VIEWS, WEIGHTED_ATEN_OPS


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


# --------------------------------------------------------------------------- the pass

@torch.no_grad()
def lower_int8(gm: fx.GraphModule, named, plan: QuantPlan, frozen: Frozen, *,
               fallback: str = "error", compute: str | None = None) -> fx.GraphModule:
    """Lower each site by its registered handler (``HANDLERS``). ``fallback``: "error" raises GraphError at the first op no
    handler lowers; "simulate" leaves it fake-quant, warns, and lists it in
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


def _replace(gm: fx.GraphModule, s: Site, row: Handler, module: nn.Module) -> None:
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
