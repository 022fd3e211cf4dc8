"""Pass: keep the key/value cache in 16 bits (the recipe's ``set lower.kv_cache``).

requires: a generate graph (``qdsl.graph.capture``'s static cache: every layer writes
          its keys and values with ``index_copy_(cache, 2, cache_position, new)`` into a
          float32 4-d tensor the graph holds as an attribute), lowered to ``fake`` or
          ``int8`` (attention fused or not).
ensures:  ``fake``: every value written into a cache is rounded to ``dtype`` and back
          (``_to_copy`` twice) before the write, so the float32 cache holds exactly
          what a 16-bit one would; ``int8``: every cache tensor is ``dtype``, each write
          converts its values to it, ``FusedAttention`` reads the 16-bit cache itself
          (its C++ decode kernel upcasts as it loads; prefill slices, then converts) and
          any other reader of a cache gets a float32 copy. Both compute the same function
          (the fake graph is the int8 graph's simulation); only keys and values round,
          by at most 2^-11 (fp16) or 2^-8 (bf16) of each value.

Why: a decode step reads every layer's whole filled cache: SmolLM2-135M at 560 keys,
25.8 MB in float32, a fifth of its int8 weights. llama.cpp keeps an f16 cache by
default. fp16 keeps 11 significant bits but overflows past 65504; bf16 has float32's
range and 8 bits.
"""

from __future__ import annotations

import torch
from torch import fx

from ..errors import GraphError
from ..graph.attrs import param, set_tensor
from ..graph.ops import aten_name as _target
from ..runtime.attention import FusedAttention

KV_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_WRITE = "aten.index_copy_.default"
_TO_COPY = torch.ops.aten._to_copy.default


def cache_writes(gm: fx.GraphModule) -> list[fx.Node]:
    """The graph's cache writes: ``index_copy_`` along dim 2 into a 4-d float tensor
    the graph holds (``get_attr``), in graph order."""
    writes = []
    for n in gm.graph.nodes:
        if _target(n) != _WRITE or len(n.args) != 4 or n.args[1] != 2:
            continue
        cache = n.args[0]
        if not (isinstance(cache, fx.Node) and cache.op == "get_attr"):
            continue
        t = param(gm, cache.target)
        if t.dim() == 4 and t.is_floating_point():
            writes.append(n)
    return writes


def cache_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The tensors ``cache_writes`` write into, by target, in write order."""
    return {w.args[0].target: param(gm, w.args[0].target) for w in cache_writes(gm)}


def kv_cache(gm: fx.GraphModule, dtype: str | None, *, store: bool) -> int:
    """Round (``store=False``, fake) or store (``store=True``, int8) the key/value cache
    in ``dtype`` ("fp16" / "bf16"; None or "fp32": nothing to do) -> the number of cache
    tensors changed. A graph with no cache write is a GraphError: the setting would
    do nothing (a plain graph has no cache)."""
    if dtype in (None, "fp32"):
        return 0
    if dtype not in KV_DTYPES:
        raise ValueError(f"lower.kv_cache must be one of {', '.join(KV_DTYPES)}, got {dtype!r}")
    dt = KV_DTYPES[dtype]
    writes = cache_writes(gm)
    if not writes:
        raise GraphError(f"set lower.kv_cache = {dtype}: the graph writes no key/value cache "
                         "(index_copy_ into a cache tensor)",
                         hint="the setting applies to causal LMs compiled as generate graphs")
    graph, done = gm.graph, set()
    for w in writes:
        cache, new = w.args[0], w.args[3]   # index_copy_(cache, 2, positions, new)
        with graph.inserting_before(w):
            cast = graph.call_function(_TO_COPY, (new,), {"dtype": dt})
            if not store:
                cast = graph.call_function(_TO_COPY, (cast,), {"dtype": torch.float32})
        w.update_arg(3, cast)
        if not store or cache.target in done:
            continue
        t = param(gm, cache.target)
        if t.dtype != torch.float32:
            raise GraphError(f"cache {cache.target} is {t.dtype}, not float32: stored "
                             "twice?", node=cache.name)
        set_tensor(gm, cache.target, t.to(dt))
        done.add(cache.target)
        for src in (cache, w):       # anything else reading the cache gets float32
            for reader in [u for u in src.users if not _takes_16bit(gm, u, w)]:
                with graph.inserting_before(reader):
                    up = graph.call_function(_TO_COPY, (src,), {"dtype": torch.float32})
                reader.replace_input_with(src, up)
    graph.lint()
    gm.recompile()
    return len(done) if store else len({w.args[0].target for w in writes})


def _takes_16bit(gm: fx.GraphModule, user: fx.Node, write: fx.Node) -> bool:
    """Whether ``user`` takes the 16-bit cache as it is: the write itself, or a fused
    attention reading the written cache only as its keys or values."""
    if user is write:
        return True
    return (user.op == "call_module" and isinstance(gm.get_submodule(user.target), FusedAttention)
            and write in user.args[1:3] and write not in (user.args[0], *user.args[3:]))
