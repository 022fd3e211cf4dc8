"""The recipe's quantizers in an eager student, for training (straight-through).

Weights: every node the plan gives a quantized weight spec gets a parametrization
of its module's ``weight``: the observer's scale / zero point of the current float
weight (no gradient; 1-bit symmetric: XTC's ``mean|W|`` per row or group), then
``quant.primitives.fake_quantize``, whose gradient is the identity where the code lies
on the grid and zero where it was clamped (1-bit: identity everywhere). A tied weight
(GPT-2's ``lm_head`` / ``wte``) stays one parameter under both parametrizations.

Activations: the input of every quantized linear whose producer's activation spec is
quantized (``passes.lower_int8.weight_sites``: what ``--lower int8`` turns into integer
kernels) is fake-quantized by a forward pre-hook: dynamic specs by
``runtime.fakequant.DynamicFakeQuant`` (range of the tensor itself, per token or per
tensor), static per-tensor specs by ``EmaFakeQuant`` (XTC's running range, momentum
0.95). Other activation quantizers (on residual sums, attention probabilities) are not
simulated while training; ``compile`` applies them to the trained weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..config.spec import GroupWise, PerTensor, TensorSpec
from ..errors import ModelError
from ..passes.lower_int8 import weight_sites
from ..quant.observers import make_observer
from ..quant.primitives import (choose_qparams, fake_quantize, group_unview, group_view,
                               is_binary, qrange)
from ..runtime.fakequant import DynamicFakeQuant

MOMENTUM = 0.95  # XTC's static activation range: range = m * range + (1 - m) * batch
FREEZE_MOMENTUM = 0.01  # Nagel et al. 2022's oscillation frequency EMA: f = m * o + (1 - m) * f


def _grid_view(w: Tensor, spec: TensorSpec, in_out: bool) -> Tensor:
    """``w`` as its quantizer sees it: [out, in] (``in_out``: Conv1D's [in, out]
    transposed), grouped for group-wise specs; ``_grid_unview`` inverts it."""
    wt = w.t() if in_out else w
    return group_view(wt, spec.granularity.size) if isinstance(spec.granularity, GroupWise) else wt


def _grid_unview(wt: Tensor, spec: TensorSpec, in_out: bool) -> Tensor:
    if isinstance(spec.granularity, GroupWise):
        wt = group_unview(wt)
    return wt.t() if in_out else wt


def _on_grid(w: Tensor, spec: TensorSpec, in_out: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``_grid_view(w)`` and the observer's scale / zero point of ``w`` (no gradient;
    1-bit symmetric: ``mean|W|``)."""
    with torch.no_grad():
        obs = make_observer(spec)
        obs((w.t() if in_out else w).detach().float())
        scale, zero_point = obs.qparams()
    return _grid_view(w, spec, in_out), scale, zero_point


def qat_weight(w: Tensor, spec: TensorSpec, in_out: bool = False) -> Tensor:
    """Fake-quantized ``w`` with a straight-through gradient (``in_out``: Conv1D [in, out])."""
    wt, scale, zero_point = _on_grid(w, spec, in_out)
    return _grid_unview(fake_quantize(wt, scale, zero_point, spec.bits, spec.symmetric),
                        spec, in_out)


def code_distance(w: Tensor, spec: TensorSpec, in_out: bool = False) -> tuple[Tensor, int]:
    """(sum of squared distances, element count) between ``w`` (clipped to the grid's
    range) and its quantized value, in units of the scale: Nagel et al. 2022's
    oscillation dampening term, scale-independent. The gradient reaches ``w`` only
    (scale and target held), pulling each latent weight towards the grid point it
    rounds to (1-bit: ``|w|`` towards ``mean|w|``, away from the sign boundary)."""
    wt, scale, zero_point = _on_grid(w, spec, in_out)
    target = fake_quantize(wt.detach(), scale, zero_point, spec.bits, spec.symmetric)
    if not is_binary(spec.bits, spec.symmetric):
        qmin, qmax = qrange(spec.bits, spec.symmetric)
        wt = torch.maximum(torch.minimum(wt, (qmax - zero_point) * scale),
                           (qmin - zero_point) * scale)
    d = (wt - target) / scale
    return d.pow(2).sum(), d.numel()


class WeightQuant(nn.Module):
    """Parametrization: the module's float weight -> its fake-quantized value."""

    def __init__(self, spec: TensorSpec, in_out: bool) -> None:
        super().__init__()
        self.spec, self.in_out = spec, in_out

    def forward(self, w: Tensor) -> Tensor:
        return qat_weight(w, self.spec, self.in_out)


class LearnedScaleQuant(nn.Module):
    """Parametrization of a 1-bit weight with a learned scale (``set train.scales =
    learned``): the value is ``sign(W) * s``, one ``s`` per row or group, initialised
    to XTC's ``mean|W|`` and trained with the weights as ``log s`` (positive by
    construction; an optimizer step changes it by a fraction, whatever its size; no
    weight decay, ``Trainer``); ``W``'s gradient is straight-through as ``WeightQuant``'s.
    ``bake`` writes ``s`` into the latent weight (each row or group rescaled so its
    ``mean|W|`` is ``s``), so the artifact, whose observer measures ``mean|W|``, carries
    the learned scales with no format change."""

    def __init__(self, spec: TensorSpec, in_out: bool, w: Tensor) -> None:
        super().__init__()
        if not is_binary(spec.bits, spec.symmetric):
            raise ModelError(f"learned scales are for 1-bit weights, got {spec.describe()}")
        self.spec, self.in_out = spec, in_out
        _, scale, _ = _on_grid(w, spec, in_out)
        self.log_scale = nn.Parameter(scale.detach().float().clamp_min(1e-8).log())

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()

    def forward(self, w: Tensor) -> Tensor:
        wt = _grid_view(w, self.spec, self.in_out)
        sign = torch.where(wt.detach() >= 0, 1.0, -1.0).to(wt.dtype)
        out = sign * self.scale.to(wt.dtype) + (wt - wt.detach())
        return _grid_unview(out, self.spec, self.in_out)

    @torch.no_grad()
    def bake(self, w: Tensor) -> None:
        """Rescale the latent ``w`` in place: ``mean|W|`` of each row / group = ``s``."""
        wt, observed, _ = _on_grid(w, self.spec, self.in_out)
        factor = self.scale / observed.clamp_min(1e-12)
        w.copy_(_grid_unview(wt * factor.to(wt.dtype), self.spec, self.in_out))


class EmaFakeQuant(nn.Module):
    """Static per-tensor activation fake-quant with XTC's running range (momentum 0.95):
    updated from each training batch, frozen in eval mode."""

    def __init__(self, spec: TensorSpec, momentum: float = MOMENTUM) -> None:
        super().__init__()
        if not isinstance(spec.granularity, PerTensor):
            raise ModelError(f"training simulates static activations per tensor only, "
                             f"got {spec.describe()}")
        self.spec, self.momentum = spec, momentum
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                lo, hi = x.detach().min().float(), x.detach().max().float()
                m = self.momentum if int(self.seen) else 0.0
                self.lo.mul_(m).add_((1 - m) * lo)
                self.hi.mul_(m).add_((1 - m) * hi)
                self.seen.add_(1)
        scale, zp = choose_qparams(self.lo, self.hi, self.spec.bits, self.spec.symmetric)
        return fake_quantize(x, scale, zp, self.spec.bits, self.spec.symmetric)


@dataclass
class Quantized:
    """What ``attach`` put into a model, so ``detach`` can take it out again."""

    weights: dict[str, TensorSpec] = field(default_factory=dict)   # module path -> spec
    inputs: dict[str, nn.Module] = field(default_factory=dict)      # module path -> quantizer
    hooks: list = field(default_factory=list)
    order: dict[str, list[str]] = field(default_factory=dict)       # parameter order
    act_modules: nn.ModuleDict = field(default_factory=nn.ModuleDict)


def attach(model: nn.Module, captured_gm, named, plan, learned_scales: bool = False) -> Quantized:
    """Put the plan's weight quantizers and linear-input quantizers into ``model`` (the
    eager module ``captured_gm`` was captured from, module paths as in ``named``);
    ``learned_scales``: 1-bit weights get ``LearnedScaleQuant``."""
    q = Quantized()
    learned: set[int] = set()  # the latent weights given a learned scale
    for s in weight_sites(captured_gm, named, plan):
        node = named[s.name]
        try:
            module = model.get_submodule(node.module)
        except AttributeError as e:
            raise ModelError(f"{s.name}: module {node.module!r} not found in the model") from e
        if not isinstance(getattr(module, "weight", None), Tensor):
            raise ModelError(f"{s.name}: module {node.module!r} has no weight to train")
        if node.module in q.weights:
            if q.weights[node.module] != s.weight:
                raise ModelError(f"{s.name}: module {node.module!r} is read with two "
                                 f"different weight specs")
        else:
            q.order[node.module] = list(module._parameters)
            in_out = node.weight_layout == "in_out"
            learn = learned_scales and is_binary(s.weight.bits, s.weight.symmetric)
            if learn:
                if id(module.weight) in learned:
                    raise ModelError(f"{s.name}: a tied 1-bit weight cannot learn two scales "
                                     "(`set train.scales = learned`); quantize one of its "
                                     "uses at another width")
                learned.add(id(module.weight))
            parametrize.register_parametrization(
                module, "weight", LearnedScaleQuant(s.weight, in_out, module.weight) if learn
                else WeightQuant(s.weight, in_out))
            q.weights[node.module] = s.weight
        if s.kind == "linear" and s.input is not None and s.input.quantized:
            if node.module in q.inputs:
                continue
            aq = DynamicFakeQuant(s.input) if s.input.dynamic else EmaFakeQuant(s.input)
            key = node.module.replace(".", "__")
            q.act_modules[key] = aq
            q.inputs[node.module] = aq
            q.hooks.append(module.register_forward_pre_hook(
                lambda mod, args, aq=aq: (aq(args[0]), *args[1:])))
    return q


def latent_weights(model: nn.Module, q: Quantized):
    """(latent float weight, spec, in_out) of every quantized weight; a tied weight once
    per distinct spec (as the artifact stores it)."""
    seen = set()
    for path, spec in q.weights.items():
        wq = model.get_submodule(path).parametrizations["weight"]
        key = (id(wq.original), spec.describe(), wq[0].in_out)
        if key not in seen:
            seen.add(key)
            yield wq.original, spec, wq[0].in_out


def dampening(model: nn.Module, q: Quantized) -> Tensor:
    """Mean squared code distance over every quantized weight element (``code_distance``)."""
    total, count = None, 0
    for w, spec, in_out in latent_weights(model, q):
        d, n = code_distance(w, spec, in_out)
        total, count = (d if total is None else total + d), count + n
    if total is None:
        return torch.zeros(())
    return total / count


def binary_weights(model: nn.Module, q: Quantized) -> list[Tensor]:
    """The latent float weight of every 1-bit weight (a tied one once per spec)."""
    return [w for w, spec, _ in latent_weights(model, q) if is_binary(spec.bits, spec.symmetric)]


def binary_signs(model: nn.Module, q: Quantized) -> list[Tensor]:
    """The sign bits of every 1-bit weight (to count flips across an optimizer step)."""
    return [w.detach() >= 0 for w in binary_weights(model, q)]


class Freezer:
    """Iterative freezing of oscillating 1-bit weights (Nagel et al. 2022, section 4.2).

    Per latent 1-bit weight, an exponential moving average of its sign flips (momentum
    ``FREEZE_MOMENTUM``: ``f = 0.01 * flipped + 0.99 * f``; at 1 bit every flip after
    the first reverses the previous one, so a flip is an oscillation) and of its sign
    (+-1). After each optimizer step (``step``), a weight whose frequency exceeds
    ``threshold`` is frozen: its latent value is set to the sign its average favours
    times its current magnitude and held there at every later step (the optimizer's
    move, weight decay included, is undone), so its bit stops changing and the rest of
    the model trains around it. ``state_dict`` / ``load_state_dict`` carry the
    averages and the frozen values through checkpoints."""

    def __init__(self, weights: list[Tensor], threshold: float,
                 momentum: float = FREEZE_MOMENTUM) -> None:
        if not 0 < threshold <= 1:
            raise ModelError(f"train.freeze: the threshold is a flip frequency in (0, 1], "
                             f"got {threshold}")
        self.weights, self.threshold, self.momentum = weights, threshold, momentum
        self.freq = [torch.zeros(w.shape) for w in weights]
        self.sign = [torch.zeros(w.shape) for w in weights]
        self.frozen = [torch.zeros(w.shape, dtype=torch.bool) for w in weights]
        self.value = [torch.zeros(w.shape) for w in weights]

    @torch.no_grad()
    def step(self, before: list[Tensor]) -> float:
        """After an optimizer step: undo it on the frozen weights, update the averages
        from the signs ``before`` it (``binary_signs``), freeze the weights now past the
        threshold; the fraction of 1-bit weights frozen."""
        m, frozen, total = self.momentum, 0, 0
        for w, b, f, sg, fr, val in zip(self.weights, before, self.freq, self.sign,
                                        self.frozen, self.value):
            w.data[fr] = val[fr].to(w.dtype)      # undo the step on the frozen weights
            now = w.data >= 0
            f.mul_(1 - m).add_((now != b).float(), alpha=m)
            sg.mul_(1 - m).add_(now.float() * 2 - 1, alpha=m)
            new = (f > self.threshold) & ~fr
            if bool(new.any()):
                mag = w.data[new].float().abs().clamp_min(1e-12)
                keep = torch.where(sg[new] >= 0, 1.0, -1.0) * mag
                val[new] = keep
                fr |= new
                w.data[new] = keep.to(w.dtype)
            frozen += int(fr.sum())
            total += fr.numel()
        return frozen / total if total else 0.0

    def state_dict(self) -> dict[str, Tensor]:
        out = {}
        for i, (f, sg, fr, val) in enumerate(zip(self.freq, self.sign, self.frozen, self.value)):
            out.update({f"{i}.freq": f, f"{i}.sign": sg, f"{i}.frozen": fr, f"{i}.value": val})
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for i in range(len(self.weights)):
            for name, dst in (("freq", self.freq), ("sign", self.sign), ("frozen", self.frozen),
                              ("value", self.value)):
                t = state.get(f"{i}.{name}")
                if t is None or t.shape != dst[i].shape:
                    raise ModelError("--resume: the checkpoint's freezing state does not "
                                     "match this student's 1-bit weights")
                dst[i] = t.clone().to(dst[i].dtype)


def flip_fraction(before: list[Tensor], after: list[Tensor]) -> float | None:
    """The fraction of 1-bit weights whose sign changed (None: no 1-bit weights)."""
    n = sum(b.numel() for b in before)
    if not n:
        return None
    return sum(int((b != a).sum()) for b, a in zip(before, after)) / n


def detach(model: nn.Module, q: Quantized) -> None:
    """Remove the quantizers: the model keeps its trained float weights (learned 1-bit
    scales baked into them, ``LearnedScaleQuant.bake``)."""
    for h in q.hooks:
        h.remove()
    for path in q.weights:
        module = model.get_submodule(path)
        wq = module.parametrizations["weight"]
        if isinstance(wq[0], LearnedScaleQuant):
            wq[0].bake(wq.original)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        # removal re-registers `weight` last; the graph (and its hash) follows the
        # registration order, so put it back where it was
        params, order = module._parameters, q.order.get(path, [])
        items = [(k, params[k]) for k in order if k in params]
        items += [(k, v) for k, v in params.items() if k not in order]
        params.clear()
        params.update(items)
    q.hooks.clear()
    q.order.clear()
    q.weights.clear()
    q.inputs.clear()
