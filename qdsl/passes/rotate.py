"""Pass: rotate the residual stream with a Hadamard matrix (QuaRot, Ashkboos et al. 2024).

requires: a plan with a ``rotate`` transform, fitted to a LLaMA-style graph: RMSNorms
          (their output commutes with an orthogonal map) read only by linears, one
          token embedding, Hadamard orders known for the hidden and MLP sizes
          (``check_rotate`` says what does not fit, naming the node: explain runs it).
ensures:  with Q = H_hidden (orthonormal) and H = H_ffn: each norm's scale g is folded
          into the linears reading it (W diag(g); the norm's scale becomes 1), those
          linears read the rotated stream (W Q), the embedding writes it (E Q), the
          linears writing the stream (attn.out, mlp.down) write it rotated (Q^T W,
          bias b Q); an ``OnlineHadamard`` (runtime) sits on each ``mlp.mul`` output
          and ``mlp.down`` holds W H, so the down-projection's input is rotated too. The
          float model computes the same logits (up to rounding); the named graph
          returned points ``mlp.mul`` at the rotated tensor (its quantizers, the
          down-projection's input quantizer among them, come after the rotation) and
          untied weights (embed / lm_head) at their own copies.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import fx

from ..errors import GraphError
from ..graph.attrs import param
from ..quant.hadamard import hadamard, hadamard_factors
from ..runtime.hadamard import OnlineHadamard
from .common import attr_name, fx_node
from .transform import _weight, set_tensor, set_weight

HADAMARD_PREFIX = "qdsl_hadamard__"


def _structure(named, t):
    """(norm -> its linear readers, the linears writing the stream, embed, downs) or
    GraphError naming the node that does not fit."""
    inputs = named.inputs
    where = f"rotate ({t.loc})"
    readers: dict[str, list[str]] = {}
    writers = []
    for lin, li in inputs.items():
        p = named[li.producer] if li.producer else None
        if p is not None and p.role == "norm":
            readers.setdefault(p.name, []).append(lin)
        else:
            writers.append(lin)
    for n in named.nodes:
        if n.role != "norm":
            continue
        if n.op != "rms_norm":
            raise GraphError(f"{where}: {n.name} is a {n.op}; rotating the residual stream "
                             "needs RMSNorm (LLaMA-style), whose output commutes with a "
                             "rotation", node=n.name, hint="remove `rotate` for this model")
        li = inputs[readers[n.name][0]] if n.name in readers else None
        if li is None or li.norm_weight is None:
            raise GraphError(f"{where}: {n.name} feeds no linear whose scale can absorb "
                             "its weight", node=n.name)
        others = [r for r in li.readers if r not in inputs]
        if others:
            raise GraphError(f"{where}: {n.name}'s output is also read by {others[0]}, which "
                             "would see the folded, rotated values", node=n.name)
    embeds = [n for n in named.nodes if n.role == "embedding"]
    if len(embeds) != 1:
        raise GraphError(f"{where}: needs exactly one embedding (the token embedding), found "
                         f"{len(embeds)}", node=embeds[1].name if embeds else None)
    downs = [w for w in writers if w.endswith("mlp.down")]
    for w in writers:
        if not (w.endswith("attn.out") or w.endswith("mlp.down")):
            raise GraphError(f"{where}: {w} reads {inputs[w].producer}, which is not a norm: "
                             "only attn.out and mlp.down may write the residual stream",
                             node=w)
    return readers, writers, embeds[0].name, downs


def check_rotate(gm: fx.GraphModule, named, plan) -> None:
    """Raise GraphError (naming the node) if the plan's rotation does not fit the graph."""
    for t in [t for t in plan.transforms if t.kind == "rotate"]:
        _, _, embed, downs = _structure(named, t)
        sizes = [(embed, tuple(param(gm, named[embed].weight).shape)[1])]
        sizes += [(d, tuple(_weight(gm, named, d).shape)[1]) for d in downs]
        for node, n in sizes:
            if hadamard_factors(n) is None:
                raise GraphError(f"rotate ({t.loc}): no Hadamard matrix of order {n} (the "
                                 f"input size of {node}) is known to qdsl", node=node,
                                 hint="orders m * 2^k with m = 1, 2 or a Paley order "
                                      "(q + 1, q prime = 3 mod 4; 2(q + 1), q prime = 1 mod 4)")


@torch.no_grad()
def rotate(gm: fx.GraphModule, named, plan):
    rots = [t for t in plan.transforms if t.kind == "rotate"]
    if not rots:
        return named
    check_rotate(gm, named, plan)
    readers, writers, embed, downs = _structure(named, rots[0])
    e = param(gm, named[embed].weight)
    q = hadamard(e.shape[1]).to(e.device)   # meta when the int8 loader rebuilds structure
    for norm, lins in readers.items():                     # fold g, then read x Q
        li = named.inputs[lins[0]]
        g = param(gm, li.norm_weight).to(torch.float64)
        for lin in lins:
            w = _weight(gm, named, lin)
            named = set_weight(gm, named, lin, ((w.double() * g[None, :]) @ q).to(w.dtype))
        set_tensor(gm, li.norm_weight, torch.ones_like(param(gm, li.norm_weight)))
    named = set_weight(gm, named, embed, (e.double() @ q).to(e.dtype))   # [V, d] rows
    for lin in writers:                                    # write the stream rotated
        w = _weight(gm, named, lin).double()
        w = q.T @ w
        if lin in downs:
            w = w @ hadamard(w.shape[1]).to(w.device)
        named = set_weight(gm, named, lin, w.to(param(gm, named[lin].weight).dtype))
        if named[lin].bias is not None:
            b = param(gm, named[lin].bias)
            set_tensor(gm, named[lin].bias, (b.double() @ q).to(b.dtype))
    for down in downs:                                     # online H before mlp.down
        mul = named.inputs[down].producer
        node = fx_node(gm, named[mul].node)
        attr = attr_name(mul, HADAMARD_PREFIX)
        gm.add_submodule(attr, OnlineHadamard(_weight(gm, named, down).shape[1]))
        with gm.graph.inserting_after(node):
            h = gm.graph.call_module(attr, (node,))
        node.replace_all_uses_with(h, delete_user_cb=lambda user: user is not h)
        h.meta = {k: v for k, v in node.meta.items() if k in ("val", "tensor_meta",
                                                               "nn_module_stack")}
        nodes = tuple(replace(n, node=h.name) if n.name == mul else n for n in named.nodes)
        named = replace(named, nodes=nodes, by_name={n.name: n for n in nodes})
    # A tied model's export reads the shared table through one name and leaves a get_attr
    # of the other, unread. The rotated copies went behind the names the nodes read, so
    # that one still holds the unrotated table: erased, lest the artifact store it and
    # the search price it (113 MB on SmolLM2).
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()
    return named
