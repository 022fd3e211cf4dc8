"""Pass: run float attention as one ``scaled_dot_product_attention`` over the filled
part of the key/value cache.

requires: a captured graph (any lowering) with eager attention, i.e. the chain
          ``matmul(q, transpose(k)) [* scale] [+ mask] -> softmax(-1) [-> to / dropout(p,
          train=False)] -> matmul(probs, v)`` (what ``qdsl.graph.capture`` produces, so that
          scores and probs have names a recipe can quantize).
ensures:  every such chain with no quantizer inside it (scores and probs float) is one
          ``call_module`` of a ``FusedAttention`` (``qdsl_attn__<n>``), which the rest of
          the graph reads where it read the second matmul; GQA's ``repeat_kv`` copies of
          the cache are bypassed (SDPA's ``enable_gqa``); chains with a quantizer inside
          are left alone. The graph computes the same function up to float summation
          order (~1e-6 relative).

Why: the generate graph attends over the whole static cache (``max_cache_len``
positions, most of them masked) and materialises the ``[heads, T, L]`` scores,
their scaled and masked copies and the softmax. ``FusedAttention`` slices keys,
values and mask to the positions written so far (``cache_position[-1] + 1``; the
columns it drops are exactly masked, so softmax gives them weight 0) and calls
SDPA's fused CPU kernel. Measured on SmolLM2's shapes (9 heads, 3 KV heads, 1
thread): a 512-token prefill over a 1024 cache 19.1 -> 7.1 ms per layer, one decode
step 0.18 -> 0.05 ms per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, fx

from ..graph.ops import (ASSERT_OP as _ASSERT, ATTENTION_VIEWS, FUSED_ATTENTION_PREFIX,
                         aten_name as _target)
from ..runtime.attention import FusedAttention

ATTN_PREFIX = FUSED_ATTENTION_PREFIX
_MATMUL = ("aten.matmul.default", "aten.bmm.default")
_SCALE = {"aten.mul.Tensor": False, "aten.div.Tensor": True}        # op -> divides?
_PASS = ("aten.to.dtype", "aten.dropout.default", "aten.clone.default",
         "aten.alias.default")                                        # identities here


@dataclass
class Chain:
    """One eager attention in the graph: the nodes the fused call replaces."""

    q: fx.Node
    k: fx.Node                         # keys [B, H, L, d] (before the transpose)
    v: fx.Node | None = None
    scale: float = 1.0
    mask: fx.Node | None = None
    nodes: list[fx.Node] = field(default_factory=list)   # scores .. context, in order

    @property
    def context(self) -> fx.Node:
        """matmul(probs, v), the chain's output."""
        return self.nodes[-1]

    @property
    def keys_transposed(self) -> fx.Node:
        """transpose(k), the scores matmul's second operand."""
        return self.nodes[0].args[1]


def _only_user(n: fx.Node) -> fx.Node | None:
    users = [u for u in n.users if _target(u) != _ASSERT]
    return users[0] if len(users) == 1 else None


def _untransposed(kt: fx.Node) -> fx.Node | None:
    """``k`` from ``transpose(k, -2, -1)`` / ``transpose(k, 2, 3)`` of a 4-d k."""
    if _target(kt) != "aten.transpose.int":
        return None
    val = kt.meta.get("val")
    dims = {d % 4 for d in kt.args[1:3]} if val is not None and val.dim() == 4 else set()
    return kt.args[0] if dims == {2, 3} else None


def find_attention(gm: fx.GraphModule, keep: frozenset[str] = frozenset()) -> list[Chain]:
    """Every fusable eager attention: float32, 4-d, no quantizer (``call_module``) or
    second reader between the scores matmul and the context matmul, and none of its
    nodes named in ``keep`` (fx names: nodes a later pass still has to find)."""
    chains = []
    for node in gm.graph.nodes:
        if _target(node) not in _MATMUL or len(node.args) != 2:
            continue
        q, kt = node.args
        k = _untransposed(kt) if isinstance(kt, fx.Node) else None
        val = node.meta.get("val")
        if k is None or val is None or val.dim() != 4 or val.dtype != torch.float32:
            continue
        chain = Chain(q, k, nodes=[node])
        cur = _only_user(node)
        if cur is not None and _target(cur) in _SCALE and not isinstance(cur.args[1], fx.Node):
            s = float(cur.args[1])
            chain.scale = 1.0 / s if _SCALE[_target(cur)] else s
            chain.nodes.append(cur)
            cur = _only_user(cur)
        if cur is not None and _target(cur) == "aten.add.Tensor" and cur.args[0] is chain.nodes[-1]:
            chain.mask = cur.args[1] if isinstance(cur.args[1], fx.Node) else None
            if chain.mask is None:
                continue
            chain.nodes.append(cur)
            cur = _only_user(cur)
        if cur is None or _target(cur) != "aten.softmax.int" or cur.args[1] not in (-1, 3):
            continue
        chain.nodes.append(cur)
        cur = _only_user(cur)
        while cur is not None and _target(cur) in _PASS and _identity(cur):
            chain.nodes.append(cur)
            cur = _only_user(cur)
        if cur is None or _target(cur) not in _MATMUL or cur.args[0] is not chain.nodes[-1]:
            continue
        chain.v = cur.args[1]
        chain.nodes.append(cur)
        if not any(n.name in keep for n in chain.nodes):
            chains.append(chain)
    return chains


def _identity(n: fx.Node) -> bool:
    t = _target(n)
    if t == "aten.dropout.default":
        return len(n.args) >= 3 and n.args[2] is False       # eval: identity
    if t == "aten.to.dtype":
        return n.args[1] == torch.float32
    return True


def _repeated_kv(x: fx.Node) -> fx.Node | None:
    """The cache ``[B, kv, L, d]`` behind GQA's ``reshape(expand(unsqueeze(c, 2)))``."""
    if _target(x) not in ("aten.reshape.default", "aten.view.default"):
        return None
    e = x.args[0]
    if _target(e) != "aten.expand.default":
        return None
    u = e.args[0]
    if _target(u) != "aten.unsqueeze.default" or u.args[1] != 2:
        return None
    return u.args[0]


def fuse_attention(gm: fx.GraphModule, keep: frozenset[str] = frozenset()) -> list[str]:
    """Replace every chain ``find_attention(gm, keep)`` finds; returns the new modules'
    names (numbered after any the graph has)."""
    cache_position = next((n for n in gm.graph.nodes
                           if n.op == "placeholder" and n.target == "cache_position"), None)
    done = []
    first = sum(1 for name, _ in gm.named_children() if name.startswith(ATTN_PREFIX))
    for i, c in enumerate(find_attention(gm, keep), start=first):
        kt, context = c.keys_transposed, c.context
        k, v = _repeated_kv(c.k), _repeated_kv(c.v)
        gqa = k is not None and v is not None
        if not gqa:
            k, v = c.k, c.v
        attr = f"{ATTN_PREFIX}{i}"
        gm.add_submodule(attr, FusedAttention(c.scale, gqa))
        with gm.graph.inserting_before(context):
            fused = gm.graph.call_module(attr, (c.q, k, v, c.mask, cache_position))
        fused.meta = {key: val for key, val in context.meta.items()
                      if key in ("val", "tensor_meta", "nn_module_stack")}
        context.replace_all_uses_with(fused)
        for n in reversed(c.nodes):
            for u in [u for u in n.users if _target(u) == _ASSERT]:
                gm.graph.erase_node(u)
            gm.graph.erase_node(n)
        for dead in (kt, c.v):           # k's transpose, repeat_kv copies, if unread
            _erase_unread_views(gm, dead)
        done.append(attr)
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def _erase_unread_views(gm: fx.GraphModule, node) -> None:
    """Erase ``node`` and its view-like producers while nothing reads them."""
    while isinstance(node, fx.Node) and not node.users and _target(node) in ATTENTION_VIEWS:
        nxt = node.args[0]
        gm.graph.erase_node(node)
        node = nxt
