"""A whole decode step in one C++ call (issue 15, "decode at the bandwidth limit"):
``FusedStep`` runs a LLaMA-shaped w8a8, w4a8 or w4 artifact's one-token forward through
``qdsl_kernels::llama_decode_step``, one OpenMP parallel region a step with the threads
meeting at barriers (5 a layer), where the compiled step (``compiled.CompiledStep``)
enters ~150 regions, one per kernel call, and runs its wrapper and fused loops on one
thread while the others wait (session 37's profile: libgomp's spin-wait 21% of a
2-thread step).

What it takes (``plan``; anything else is refused with the reason, and the step it wraps
runs): a batch-1 generate graph lowered with ``--lower int8`` whose every linear is an
``Int8DynamicLinear`` (``recipes/int8/w8a8_dynamic*.qrec``), a ``W4DynamicLinear`` on
qdsl's kernel (``recipes/int8/w4a8_dynamic.qrec``) with symmetric activations, or a 4-bit
weight-only ``PackedLinear`` on qdsl's w4 kernel (``recipes/int8/w4_group64.qrec``: groups
of a multiple of 32 columns, ``compute_dtype`` bf16; its input stays float), named by
role (``block.i.attn.q`` .. ``block.i.mlp.down``, ``lm_head``), an ``Int8Embedding`` or
a 4-bit ``PackedEmbedding``, a ``FusedAttention`` per block over a static cache, RMSNorm
weights and rotary tables under transformers' LLaMA / Qwen2 names, and no other module
or unexpected op in the graph.

**Checked before use**: the first one-token call runs the graph eager and the fused
step on the same position and keeps the fused step only where layer 0's key and value
rows agree (``ROW_TOL``: a structural misread moves them by O(1)) and the logits are
within a sanity bound (``LOGITS_TOL``; see ``agrees`` for why not tighter); else it says
why once and runs the compiled step from then on. The numerics are the graph's up to
float32 summation order (and activation codes at a rounding tie), as for the compiled
step; on the ISA path the eager graph runs, usually bit for bit.

``$QDSL_FUSED_DECODE``: 0 never fuses; 1 or unset: fuse where the plan allows
(``GraphLM`` builds a ``FusedStep`` only where it compiles the decode step).

Measured (SmolLM2-135M, fp16 cache, context 512, paired against the compiled step in
one process, docs/performance.md *Session 40* / *Session 41*): w8a8 0.928x of its time at
1 thread, 0.854x at 2 (AVX512_VNNI), 0.982x / 0.872x forced to AVX2 (then 0.870x at 1
thread with session 41's int8-code GEMV); w4a8 1.008x / 0.779x natively, 0.934x / 0.870x
forced to AVX2; w4 weight-only (fp32 cache, *Session 42*) 0.735x / 0.697x natively,
0.604x / 0.602x forced to AVX2, and 0.92x / 0.69x of llama.cpp Q4_0's time natively.
"""

from __future__ import annotations

import logging
import os
import re
import time

import torch
from torch import fx

from .kernels import cext
from .kernels.cpu import capability
from . import hugepages
from .compiled import CompiledStep
from .attention import FusedAttention
from .int8 import Int8DynamicLinear, Int8Embedding
from .packed import PackedEmbedding, PackedLinear, W4DynamicLinear

log = logging.getLogger(__name__)

ENV = "QDSL_FUSED_DECODE"
ROLES = ("attn_q", "attn_k", "attn_v", "attn_out", "mlp_gate", "mlp_up", "mlp_down")
_LINEAR = re.compile(r"qdsl_int8__block_(\d+)_(" + "|".join(ROLES) + r")$")
_ATTN = re.compile(r"qdsl_attn__(\d+)$")
_LIFTED = re.compile(r"(?:^|\.)lifted_tensor_\d+$")
_NORM = re.compile(r"(?:^|\.)layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$")
# the float ops a LLaMA step's graph runs around its linears and attention; any other
# (an activation other than SiLU, a fake-quant, a clamp) means another computation
_ALLOWED = {f"aten.{n}" for n in (
    "sym_size.int", "select.int", "copy_.default", "arange.default", "add.Tensor", "add_.Tensor",
    "unsqueeze.default", "to.dtype_layout", "to.dtype", "to.device", "le.Tensor",
    "expand.default", "zeros.default", "where.ScalarOther", "mul.Tensor", "cat.default",
    "cos.default", "sin.default", "pow.Tensor_Scalar", "mean.dim", "rsqrt.default",
    "view.default", "transpose.int", "slice.Tensor", "neg.default", "_to_copy.default",
    "index_copy_.default", "contiguous.default", "reshape.default", "silu.default",
    "alias.default",
)} | {"_operator.getitem"}
# a constant operand is only where a LLaMA step has one: RMSNorm's epsilon (after the
# mean), the mask's position offset (on an arange), the rotary scaling (on cos / sin);
# another (an embedding or residual multiplier) is another computation
_CONSTANT_ON = {"aten.add.Tensor": ("aten.mean.dim", "aten.arange.default"),
                "aten.mul.Tensor": ("aten.cos.default", "aten.sin.default")}


def wanted() -> bool:
    return os.environ.get(ENV, "").strip().lower() not in ("0", "false", "no", "off")


class Plan:
    """What ``llama_decode_step`` takes, read off a lowered graph (``plan``)."""

    def __init__(self, embed, norms, linears, k_cache, v_cache, inv_freq, rope_scale,
                 heads, eps, scale):
        self.embed, self.norms, self.linears = embed, norms, linears
        self.k_cache, self.v_cache = k_cache, v_cache
        self.inv_freq, self.rope_scale = inv_freq, rope_scale
        self.heads, self.eps, self.scale = heads, eps, scale
        self.isa = capability().isa        # the kernels' instruction set (tests force others)
        # int8 codes with a scale a row, or packed 4-bit codes with group scales [N, G]
        # (the op tells them apart by dtype); the activations of each: 8-bit dynamic codes
        # (w8a8, w4a8) or the float input (w4 weight-only)
        self.w = [_codes(m) for m in linears]
        self.w_scale = [m.weight_scale for m in linears]
        self.bias = [m.bias for m in linears]
        self.a_bits = [32 if _weight_only(m) else 8 for m in linears]

    def __call__(self, input_ids: torch.Tensor, pos: int) -> torch.Tensor:
        out = torch.ops.qdsl_kernels.llama_decode_step(
            _codes(self.embed), self.embed.weight_scale, int(input_ids.reshape(-1)[0]),
            self.norms, self.w, self.w_scale, self.bias, self.k_cache, self.v_cache,
            self.inv_freq, self.rope_scale, pos, self.heads, self.eps, self.scale, self.isa,
            self.a_bits)
        return out.reshape(1, 1, -1)


def _codes(m: torch.nn.Module) -> torch.Tensor:
    """An int8 module's codes, or a 4-bit packed module's (uint8, two a byte)."""
    return m.weight_packed if isinstance(m, (PackedEmbedding, PackedLinear)) else m.weight


def _weight_only(m: torch.nn.Module) -> bool:
    """A packed weight-only linear (w4: its input stays float), not w4a8."""
    return type(m) is PackedLinear


def _is_linear(m: torch.nn.Module) -> bool:
    return isinstance(m, (Int8DynamicLinear, W4DynamicLinear)) or _weight_only(m)


def _linear_why(m: torch.nn.Module) -> str | None:
    """Why the step cannot run this linear (None: it can)."""
    if isinstance(m, Int8DynamicLinear):
        return None if m.act_symmetric else "asymmetric activations"
    if _weight_only(m):
        if m.bits != 4:
            return f"{m.bits}-bit packed weights (the step takes 4)"
        if not m.uses_int4_kernel():
            return (f"compute_dtype {m.compute_dtype!r} or groups of "
                    f"{m.group_size or m.in_features} columns (not qdsl's w4 kernel's)")
        return None
    _, symmetric = m._act()            # (per token, symmetric): one token is either
    if not symmetric:
        return "asymmetric activations"
    if m.compute_dtype != "bf16":
        return f"compute_dtype {m.compute_dtype!r} (the fake-quant maths, not qdsl's w4a8 kernel)"
    if (m.group_size or m.in_features) % 2:
        return f"4-bit groups of {m.group_size or m.in_features} columns (odd)"
    return None


def _attr(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _cache_of(node) -> str | None:
    """The get_attr target of the cache an ``index_copy_`` node writes, else None."""
    if (isinstance(node, fx.Node) and node.op == "call_function"
            and str(node.target) == "aten.index_copy_.default"
            and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr"):
        return node.args[0].target
    return None


def plan(gm: torch.nn.Module) -> tuple[Plan | None, str]:
    """(the plan, "") where ``gm``'s step is one ``llama_decode_step`` runs, else (None,
    why not)."""
    if not isinstance(gm, fx.GraphModule):
        return None, "not an fx graph"
    if not cext.load():
        return None, "qdsl's C++ kernels are not loaded"
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    if sorted(placeholders) != ["cache_position", "input_ids"]:
        return None, f"graph inputs {placeholders} (a batch-1 generate graph takes input_ids " \
                     "and cache_position)"
    linears: dict[tuple[int, str], torch.nn.Module] = {}
    attn: dict[int, fx.Node] = {}
    embed = head = None
    norms: dict[tuple[int, str], torch.Tensor] = {}
    final_norm = inv_freq = None
    eps = rope_scale = None
    for node in gm.graph.nodes:
        if node.op == "call_module":
            if node.target == "_guards_fn":      # torch.export's input checks
                continue
            m = gm.get_submodule(node.target)
            if _is_linear(m):
                why = _linear_why(m)
                if why is not None:
                    return None, f"{node.target}: {why}"
                if node.target == "qdsl_int8__lm_head":
                    head = m
                    continue
                hit = _LINEAR.match(node.target)
                if not hit:
                    return None, f"{node.target}: a linear with no LLaMA role"
                linears[int(hit[1]), hit[2]] = m
            elif isinstance(m, Int8Embedding) or (isinstance(m, PackedEmbedding)
                                                  and m.bits == 4):
                if embed is not None:
                    return None, "two embeddings"
                embed = m
            elif isinstance(m, FusedAttention):
                hit = _ATTN.match(node.target)
                if not hit:
                    return None, f"{node.target}: unexpected attention name"
                attn[int(hit[1])] = node
            else:
                return None, f"{node.target}: a {type(m).__name__} (not fused)"
        elif node.op == "get_attr":
            hit = _NORM.search(node.target)
            if hit:
                norms[int(hit[1]), hit[2]] = _attr(gm, node.target)
            elif node.target.endswith("model.norm.weight"):
                final_norm = _attr(gm, node.target)
            elif node.target.endswith("rotary_emb.inv_freq"):
                inv_freq = _attr(gm, node.target)
            elif not _LIFTED.search(node.target):   # caches, cache-position scalars
                return None, f"{node.target}: a tensor a LLaMA step does not read"
        elif node.op == "call_function":
            name = str(node.target)
            if name not in _ALLOWED:
                return None, f"node {node.name}: {name} (not part of a LLaMA step)"
            if name in _CONSTANT_ON and len(node.args) > 1 and \
                    isinstance(node.args[1], (int, float)) and not (
                        isinstance(node.args[0], fx.Node)
                        and str(node.args[0].target) in _CONSTANT_ON[name]):
                return None, (f"node {node.name}: {name} by the constant {node.args[1]} "
                              "(not part of a LLaMA step)")
            if name == "aten.add.Tensor" and eps is None and isinstance(node.args[0], fx.Node) \
                    and str(node.args[0].target) == "aten.mean.dim":
                eps = node.args[1]
            if name == "aten.cos.default" and rope_scale is None:
                users = list(node.users)
                if len(users) == 1 and str(users[0].target) == "aten.mul.Tensor":
                    rope_scale = users[0].args[1]
    layers = len(attn)
    if embed is None or head is None or layers == 0:
        return None, "no int8 / 4-bit embedding, quantized head or attention"
    if sorted(attn) != list(range(layers)) or len(linears) != 7 * layers:
        return None, f"{layers} attentions and {len(linears)} block linears (7 a block expected)"
    if final_norm is None or inv_freq is None or len(norms) != 2 * layers:
        return None, "RMSNorm weights or rotary frequencies not found under LLaMA's names"
    if not isinstance(eps, float) or not isinstance(rope_scale, (int, float)):
        return None, "the RMSNorm epsilon or the rotary scaling is not a constant"
    k_cache, v_cache = [], []
    for i in range(layers):
        node = attn[i]
        k, v = _cache_of(node.args[1]), _cache_of(node.args[2])
        if k is None or v is None:
            return None, f"{node.target}: keys / values not read from a static cache"
        k_cache.append(_attr(gm, k))
        v_cache.append(_attr(gm, v))
    kc = k_cache[0]
    if kc.dim() != 4 or kc.shape[0] != 1 or not all(
            c.is_contiguous() and c.shape == kc.shape and c.dtype == kc.dtype
            for c in k_cache + v_cache):
        return None, "caches are not contiguous [1, Hk, S, hd] tensors of one shape and dtype"
    hd = kc.shape[3]
    q = linears[0, "attn_q"]
    if q.out_features % hd:
        return None, f"q's {q.out_features} rows are not heads of {hd}"
    scales = {gm.get_submodule(attn[i].target).scale for i in range(layers)}
    if len(scales) != 1:
        return None, "attention scales differ between blocks"
    order = [linears[i, r] for i in range(layers) for r in ROLES] + [head]
    layer_norms = [norms[i, r] for i in range(layers)
                   for r in ("input_layernorm", "post_attention_layernorm")]
    return Plan(embed, [n.float().contiguous() for n in layer_norms + [final_norm]], order,
                k_cache, v_cache, inv_freq.float().contiguous(), float(rope_scale),
                q.out_features // hd, float(eps), float(scales.pop())), ""


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().reshape(-1), b.float().reshape(-1)
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# the first step's check: the keys / values both steps wrote for this position, per layer,
# and the logits, as relative L2 errors (fused against the graph). Matching kernels give
# 0 or float32 rounding; from the first activation code that lands on the other side of
# a rounding boundary the difference grows layer by layer (SmolLM2-135M's massive
# activations: up to 0.10 on the logits from one ISA path to another, session 40), so
# the layer-0 rows carry the structural check (a misread rotary table, bias, norm or
# embedding moves them by O(1)) and the logits only a sanity bound.
ROW_TOL = 2e-2
LOGITS_TOL = 0.3


def agrees(got: torch.Tensor, ref: torch.Tensor, rows: list[float] | None = None) -> str | None:
    """None where the fused step's first result agrees with the graph's (``rows``: the
    relative errors of layer 0's key and value rows), else what differs."""
    if not bool(torch.isfinite(got).all()):
        return "its logits are not finite"
    if rows is not None and max(rows) > ROW_TOL:
        return (f"layer 0's keys / values differ from the graph's (relative error "
                f"{max(rows):.3g} > {ROW_TOL})")
    err = _rel(got, ref)
    if err > LOGITS_TOL:
        return f"its logits differ from the graph's (relative error {err:.3g} > {LOGITS_TOL})"
    return None


class FusedStep:
    """A one-token step: ``llama_decode_step`` where ``plan`` allows and the first call's
    check against the graph passes, else the step ``fallback()`` makes (the compiled
    step), made only then.

    On its first one-token call it puts the graph's weights and caches on huge pages
    (``hugepages.rehome``, as the compiled step does; ``$QDSL_HUGE_PAGES=0``: not), reads
    the plan, runs the graph eager and the fused step on that position and compares their
    logits (``agrees``). ``active``: steps run fused; ``why``: why not (None while
    unchecked or fused). ``compile_s``, ``failed``, ``moved``, ``wrapper`` as the
    compiled step's (``wrapper`` "fused" when fused), for ``qdsl bench``'s report."""

    def __init__(self, gm: torch.nn.Module, fallback, name: str = "graph") -> None:
        self.gm, self.fallback, self.name = gm, fallback, name
        self.plan: Plan | None = None
        self.why: str | None = None if wanted() else f"${ENV}=0"
        self.inner = None                 # the fallback step, once made
        self.checked = False
        self._compile_s: float | None = None
        self._moved = hugepages.Moved()

    def __getattr__(self, name: str):
        # what else a caller reads of a compiled step (``direct``, ``fused``, ...): the
        # fallback's, once there is one
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(f"{type(self).__name__} has no {name!r} (no fallback step "
                                 "made: fused or not called yet)")
        return getattr(inner, name)

    @property
    def active(self) -> bool:
        return self.plan is not None and self.checked

    @property
    def compile_s(self):
        return self.inner.compile_s if self.inner is not None else self._compile_s

    @property
    def failed(self):
        return self.inner.failed if self.inner is not None else None

    @property
    def moved(self):
        return self.inner.moved if self.inner is not None and self.inner.moved.nbytes \
            else self._moved

    @property
    def wrapper(self):
        return self.inner.wrapper if self.inner is not None else \
            ("fused" if self.active else None)

    @staticmethod
    def _fits(inputs: dict) -> bool:
        ids, pos = inputs.get("input_ids"), inputs.get("cache_position")
        return (set(inputs) == {"input_ids", "cache_position"} and ids is not None
                and tuple(ids.shape) == (1, 1) and pos is not None and pos.numel() == 1)

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        if self.checked and self._fits(inputs):
            return self.plan(inputs["input_ids"], int(inputs["cache_position"].reshape(-1)[0]))
        if self.inner is not None:
            return self.inner(**inputs)
        if self.why is not None or not self._fits(inputs):
            if self.why is None:
                self.why = f"inputs {sorted(inputs)} are not one token of a batch-1 graph"
            return self._fall_back(inputs)
        t0 = time.perf_counter()
        if hugepages.wanted():   # before the plan: it holds the tensors rehome moves
            with torch.inference_mode(False), torch.no_grad():
                self._moved = hugepages.rehome(self.gm)
        self.plan, why = plan(self.gm)
        if self.plan is None:
            self.why = why
            return self._fall_back(inputs)
        pos = int(inputs["cache_position"].reshape(-1)[0])
        ref = self.gm(**inputs)        # writes this position's keys / values; so does ours
        p = self.plan
        rows = [p.k_cache[0][0, :, pos].clone(), p.v_cache[0][0, :, pos].clone()]
        try:
            got = p(inputs["input_ids"], pos)
        except Exception as e:  # noqa: BLE001 - an optimisation: keep the graph's step
            return self._refuse(f"{type(e).__name__}: {e}", inputs, ref)
        why = agrees(got, ref, [_rel(p.k_cache[0][0, :, pos], rows[0]),
                                _rel(p.v_cache[0][0, :, pos], rows[1])])
        if why is not None:
            return self._refuse(why, inputs, ref)
        self.checked = True
        self._compile_s = time.perf_counter() - t0
        log.info("%s decodes through llama_decode_step (one parallel region a step)",
                 self.name)
        return got

    def _fall_back(self, inputs: dict) -> torch.Tensor:
        log.info("%s: no fused decode step (%s)", self.name, self.why)
        self.plan = None
        self.inner = self.fallback()
        return self.inner(**inputs)

    def _refuse(self, why: str, inputs: dict, ref: torch.Tensor) -> torch.Tensor:
        self.plan, self.why = None, why
        log.warning("the fused decode step of %s is off: %s; decoding with the compiled "
                    "step", self.name, why)
        self.gm(**inputs)    # this position's keys / values as the graph writes them
        self.inner = self.fallback()
        return ref


def decode_step(gm: torch.nn.Module, name: str = "graph"):
    """The one-token step ``GraphLM`` and ``qdsl bench`` run when decoding is compiled: a
    ``FusedStep`` falling back to the compiled step (``$QDSL_FUSED_DECODE=0``: the compiled
    step itself)."""
    if not wanted():
        return CompiledStep(gm, name)
    return FusedStep(gm, lambda: CompiledStep(gm, name), name)
