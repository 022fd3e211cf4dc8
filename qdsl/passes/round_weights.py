"""Passes: GPTQ / AWQ weight rounding (specs with ``rounding``), around calibration.

``insert_input_stats`` (OBSERVE, after ``insert_observers``)
  requires: the plan is validated (``validate_plan`` refused rounding on a weight
            that is not a linear's).
  ensures:  each linear whose weight spec has ``rounding`` reads its input through an
            ``InputStats`` (``qdsl_stats__<name>``; linears reading the same input,
            such as q / k / v, share one), which returns it unchanged, so the graph
            still computes the float model; returns {canonical name: InputStats}.
``round_weights`` (FREEZE, before ``freeze``)
  requires: calibration ran through those recorders.
  ensures:  {canonical name: ``Rounded``} with GPTQ's or AWQ's codes on the spec's grid
            (and AWQ's input scale); the recorders are gone from the graph (each op
            reads its input again) and their memory freed; ``freeze`` stores these codes
            instead of rounding to nearest.

The Hessians come from the float model's inputs in one calibration pass (no
re-run of later layers on earlier layers' quantized outputs); docs/algorithms-weights.md.
``round_sites`` is the per-site step both compiles share: ``round_weights`` runs it on
every site at once, the streamed compile (``compiler.stream``) on one stage's sites
after that stage's windows, with the same statistics (float inputs), so the same codes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor, fx

from ..errors import GraphError
from ..graph.attrs import param
from ..graph.ops import LINEAR_INPUT_VIEWS, WEIGHTED_ATEN_OPS
from ..plan import QuantPlan
from ..progress import Progress
from ..progress import bar as progress_bar
from ..quant.awq import awq_codes
from ..quant.gptq import gptq_codes
from ..quant.hessian import InputStats
from ..runtime.conv1d import oriented
from ..config.rounding import AWQ
from .common import attr_name, remove_inserted, weight_use

log = logging.getLogger(__name__)
STATS_PREFIX = "qdsl_stats__"
LINEAR_OPS = ("aten.linear.default", "aten.addmm.default")


@dataclass
class Rounded:
    """One weight's rounding: int32 codes [out, in], the spec-shaped (scale, zero_point),
    and AWQ's per-input-channel scale s ([in]; the linear reads x / s) or None."""

    codes: Tensor
    scale: Tensor
    zero_point: Tensor
    in_scale: Tensor | None = None


def rounding_sites(named, plan: QuantPlan) -> list:
    """The named nodes whose quantized weight spec asks for GPTQ / AWQ, in graph order."""
    out = []
    for node in named.nodes:
        spec = plan[node.name].weight
        if spec is not None and spec.quantized and spec.rounding is not None:
            out.append(node)
    return out


def linear_input(gm: fx.GraphModule, node, rule: str = "") -> tuple[fx.Node, int]:
    """(op, index of its input argument) of a rounding site; GraphError naming the node
    (and ``rule``, where the rounding was asked) when its weight is not read by a linear
    (an embedding has no input to weigh)."""
    op, _ = weight_use(gm, node)
    target = str(op.target)
    if target not in LINEAR_OPS:
        raise GraphError(f"gptq / awq needs the calibration inputs of a linear, but "
                         f"{node.name}'s weight is read by {target}"
                         + (f" (rounding asked by the rule at {rule})" if rule else ""),
                         node=node.name,
                         hint=f"round it to nearest with a later rule: `{node.name} -> rtn`")
    return op, WEIGHTED_ATEN_OPS[target][0]


def check_awq_input(gm: fx.GraphModule, named, plan: QuantPlan, node, rule: str = "") -> None:
    """GraphError when an AWQ linear's input is quantized to 8 bits or less (what the
    integer kernels take): AWQ multiplies a float input
    by 1/s (``InputScale``), which would then sit after the input quantizer, so the
    integer input kernels could not be used and the search ignored that quantizer."""
    op, i = linear_input(gm, node, rule)
    by_fx = {n.node: n.name for n in named.nodes}
    x = op.args[i]
    while isinstance(x, fx.Node) and x.name not in by_fx and x.op == "call_function" \
            and str(x.target) in LINEAR_INPUT_VIEWS:
        x = x.args[0]
    producer = by_fx.get(x.name) if isinstance(x, fx.Node) else None
    spec = plan[producer].activation if producer is not None else None
    if spec is not None and spec.quantized and spec.bits <= 8:
        raise GraphError(f"awq on {node.name}: its input {producer} is quantized "
                         f"({spec.describe()}); AWQ scales a float input"
                         + (f" (rounding asked by the rule at {rule})" if rule else ""),
                         node=node.name, hint="use gptq with quantized inputs, or keep "
                         f"{producer}'s activation at more than 8 bits (a16, fp16, float)")


def insert_input_stats(gm: fx.GraphModule, named, plan: QuantPlan) -> dict[str, InputStats]:
    stats: dict[str, InputStats] = {}
    shared: dict[fx.Node, tuple[fx.Node, InputStats]] = {}
    for node in rounding_sites(named, plan):
        op, i = linear_input(gm, node)
        x = op.args[i]
        if x not in shared:
            attr = attr_name(node.name, STATS_PREFIX)
            mod = InputStats()
            gm.add_submodule(attr, mod)
            with gm.graph.inserting_after(x):
                rec = gm.graph.call_module(attr, (x,))
            rec.meta = {k: v for k, v in x.meta.items() if k in ("val", "tensor_meta")}
            shared[x] = (rec, mod)
        rec, mod = shared[x]
        op.update_arg(i, rec)
        stats[node.name] = mod
    gm.graph.lint()
    gm.recompile()
    return stats


@torch.no_grad()
def round_weights(gm: fx.GraphModule, named, plan: QuantPlan, stats: dict[str, InputStats],
                  *, progress: Progress = True) -> dict[str, Rounded]:
    """Every rounding site at once (the in-memory compile, after the one calibration
    pass); then the recorders leave the graph."""
    sites = rounding_sites(named, plan)
    out = round_sites(gm, sites, plan, stats, recorder_users(sites, stats), progress=progress)
    remove_inserted(gm, STATS_PREFIX)
    return out


def recorder_users(sites: list, stats: dict[str, InputStats]) -> dict[int, int]:
    """{id of a recorder: how many rounding sites read it} (q / k / v share one), what
    ``round_sites`` counts down to free a recorder after its last linear."""
    users: dict[int, int] = {}
    for node in sites:
        users[id(stats[node.name])] = users.get(id(stats[node.name]), 0) + 1
    return users


@torch.no_grad()
def round_sites(gm: fx.GraphModule, sites: list, plan: QuantPlan,
                stats: dict[str, InputStats], users: dict[int, int], *,
                progress: Progress = True) -> dict[str, Rounded]:
    """GPTQ / AWQ codes of ``sites`` (some of ``rounding_sites``: all of them in memory,
    one stage's in the streamed compile) from their recorders' statistics; a recorder's
    statistics are freed once ``users`` (``recorder_users``, updated here) says its last
    site is rounded. The recorders stay in the graph."""
    out: dict[str, Rounded] = {}
    for node in progress_bar(sites, desc="rounding weights", unit="linear",
                             progress=progress if sites else False, leave=False):
        spec, mod = plan[node.name].weight, stats[node.name]
        if mod.count == 0:
            raise GraphError(f"{spec.rounding.name} on {node.name}: its linear saw no "
                             "calibration input", node=node.name)
        w = oriented(param(gm, node.weight), node.weight_layout).float()
        t0 = time.perf_counter()
        if isinstance(spec.rounding, AWQ):
            q, scale, zp, s, st = awq_codes(w, mod.hessian(), mod.act_mean(), spec)
            out[node.name] = Rounded(q, scale, zp, s)
            what = f"alpha {st.alpha:g}{', clipped' if st.clipped else ''}"
        else:
            q, scale, zp, st = gptq_codes(w, mod.hessian(), spec)
            out[node.name] = Rounded(q, scale, zp)
            what = f"rows kept at RTN {st.rows_rtn}/{st.rows}, damp {st.damp:g}"
        log.info("%s %s: output error %.4g (RTN %.4g), %s, %.2f s", spec.rounding.name,
                 node.name, st.error, st.rtn_error, what, time.perf_counter() - t0)
        users[id(mod)] -= 1
        if users[id(mod)] == 0:  # the last linear reading this input: free its statistics
            mod.xtx, mod.abs_sum = torch.empty(0), torch.empty(0)
    return out
