"""Passes: transforms of the float graph before the observers (docs/algorithms.md).

``collect_stats``
    requires: a plan whose transforms (``plan.transforms``) were fitted to ``named``.
    ensures:  each SmoothQuant group's producer output is read through a
              ``ChannelAbsMax`` (``qdsl_stat__<producer>``) that records max |x_j| per
              channel and returns x unchanged; returns them. A calibration run follows.
``smooth``
    requires: statistics from ``collect_stats`` + calibration, or the scales of an
              earlier compile (an artifact's ``Frozen.smooth``).
    ensures:  the statistics modules are gone; for each group with scales s
              (``quant.channelstats.smooth_scales``), the producer's output is divided
              by s (folded into the norm's weight and bias, or the linear's output rows)
              and each consumer's weight columns are multiplied by s: the float model
              computes the same function (up to rounding). A consumer whose weight is
              tied to another node (lm_head / embed) gets its own copy (the named graph
              returned points its weight there). Returns (named graph, scales).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, fx, nn

from ..errors import GraphError
from ..graph.attrs import param, set_tensor as _set_tensor
from ..quant.channelstats import ChannelAbsMax, smooth_scales
from ..runtime.conv1d import oriented
from .common import WEIGHT_PREFIX, attr_name, fx_node, remove_inserted, replace_weight

STAT_PREFIX = "qdsl_stat__"


def collect_stats(gm: fx.GraphModule, named, plan) -> dict[str, ChannelAbsMax]:
    stats: dict[str, ChannelAbsMax] = {}
    for t in plan.transforms:
        if t.kind != "smooth" or t.producer in stats:
            continue
        stats[t.producer] = m = ChannelAbsMax()
        attr = attr_name(t.producer, STAT_PREFIX)
        gm.add_submodule(attr, m)
        node = fx_node(gm, named[t.producer].node)
        with gm.graph.inserting_after(node):
            q = gm.graph.call_module(attr, (node,))
        node.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
        q.meta = {k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")}
    gm.recompile()
    return stats


def set_tensor(gm: fx.GraphModule, target: str, value: Tensor) -> None:
    """Give get_attr ``target`` a new tensor (never writing into the old one, which the
    source model may share)."""
    _set_tensor(gm, target, value.contiguous())


def set_weight(gm: fx.GraphModule, named, name: str, value: Tensor):
    """Replace node ``name``'s weight by ``value`` ([out, in]). A weight other ops read
    too (tied) is left to them: this node gets its own copy, ``qdsl_weight__<name>``
    (what ``lower_fake`` writes later), and the returned named graph says so."""
    node = named[name]
    value = oriented(value, node.weight_layout)
    readers = sum(len(n.users) for n in gm.graph.nodes
                  if n.op == "get_attr" and n.target == node.weight)
    if readers <= 1 and node.tied is None:
        set_tensor(gm, node.weight, value)
        return named
    replace_weight(gm, node, value)
    return retarget(named, name, attr_name(name, WEIGHT_PREFIX))


def retarget(named, name: str, weight: str):
    """The named graph with node ``name`` reading ``weight`` and no longer tied."""
    nodes = tuple(replace(n, weight=weight, tied=None) if n.name == name
                  else replace(n, tied=None) if n.tied == name else n for n in named.nodes)
    return replace(named, nodes=nodes, by_name={n.name: n for n in nodes})


def _weight(gm, named, name: str) -> Tensor:
    node = named[name]
    return oriented(param(gm, node.weight), node.weight_layout)   # [out, in]


@torch.no_grad()
def smooth(gm: fx.GraphModule, named, plan, scales: dict[str, Tensor] | None,
           stats: dict[str, ChannelAbsMax] | None):
    groups = [t for t in plan.transforms if t.kind == "smooth"]
    if not groups:
        return named, {}
    if scales is None:
        if stats is None:
            raise GraphError("smooth needs calibration statistics (run collect_stats and "
                             "calibrate first) or stored scales", node=groups[0].producer)
        scales = {}
        for t in groups:
            x = stats[t.producer].absmax
            if not x.numel():
                raise GraphError(f"smooth ({t.loc}): no calibration data reached "
                                 f"{t.producer}", node=t.producer)
            w = torch.stack([_weight(gm, named, c).abs().amax(0).float()
                             for c in t.consumers]).amax(0)
            scales[t.producer] = smooth_scales(x, w, t.alpha)
    remove_inserted(gm, STAT_PREFIX)
    for t in groups:
        s = scales[t.producer]
        fold = named[t.fold]
        if t.fold_kind == "norm":
            li = named.inputs[t.consumers[0]]
            targets = [a for a in (li.norm_weight, li.norm_bias) if a is not None]
        else:
            w = _weight(gm, named, t.fold)
            named = set_weight(gm, named, t.fold, w / s.to(w.dtype)[:, None])
            targets = [fold.bias] if fold.bias is not None else []
        for a in targets:   # norm scale and bias, or the linear's bias: divided by s
            v = param(gm, a)
            set_tensor(gm, a, v / s.to(v.dtype))
        for c in t.consumers:
            w = _weight(gm, named, c)
            named = set_weight(gm, named, c, w * s.to(w.dtype)[None, :])
    gm.graph.lint()
    gm.recompile()
    return named, scales
