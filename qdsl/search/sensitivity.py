"""Sensitivity of every (unit, choice): a Fisher score, and the direct loss change.

The model's plain graph gets a probe on each searched activation (the output of the
node, as ``insert_observers`` puts observers) and on each searched linear's weight (for
that op only: a tied weight's other use is untouched). Three passes over calibration
windows, ``batch`` windows at a time:

1. **observe** (no grad): the recipe observers of every static activation spec
   (``quant.observers.make_observer``) see each activation; frozen afterwards into the
   modules ``compile`` would run (``runtime.fakequant.activation_module``);
2. **score**: one forward + backward of the mean next-token loss per batch. For a
   tensor x with gradient g and a choice's quantization error d = q(x) - x, the
   second-order change of the mean loss under the empirical Fisher (HAWQ; ModelOpt's
   AutoQuantize) is ``0.5 * N * sum(g^2 d^2)`` (N tokens: the Fisher of a mean loss of
   N terms is N g^2 when the per-token gradients are taken as their sum). Activations:
   summed in the gradient hook, per choice; weights: ``N g^2`` accumulated per element,
   priced against ``fake_quantize_weight`` at the end. Scores are averaged over batches:
   a predicted increase of the mean loss (nats per token), additive over units;
3. **check** (no grad): for a sample of (unit, choice), only that unit quantized, the
   loss change measured directly; Spearman's rank correlation with the scores.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn

from ..config.spec import TensorSpec
from ..graph.attrs import param
from ..passes.common import set_activation_module, weight_use
from ..progress import bar as progress_bar
from ..quant.observers import make_observer
from ..runtime.conv1d import oriented
from ..runtime.fakequant import activation_module, fake_quantize_weight
from .units import Space

PROBE_W = "qdsl_searchw__"


def _key(spec: TensorSpec | None) -> str:
    return "float" if spec is None else repr(spec)


class ActProbe(nn.Module):
    """On a node's output: observes, scores or quantizes it (``mode``)."""

    def __init__(self, specs: list[TensorSpec]):
        super().__init__()
        self.specs = specs
        self.observers = nn.ModuleList(
            [make_observer(s) if s.quantized and not s.dynamic else nn.Identity() for s in specs])
        self.quant: list[nn.Module | None] = [None] * len(specs)
        self.scores = [0.0] * len(specs)
        self.mode, self.use, self.tokens = "off", -1, 0

    def freeze(self) -> None:
        self.quant = [activation_module(s, o if s.quantized and not s.dynamic else None)
                      for s, o in zip(self.specs, self.observers)]

    def _apply(self, i: int, x: Tensor) -> Tensor:
        q = self.quant[i]
        return x if q is None else q(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "observe":
            for s, o in zip(self.specs, self.observers):
                if s.quantized and not s.dynamic:
                    o(x.detach())
        elif self.mode == "score" and x.requires_grad:
            xd, n = x.detach(), self.tokens

            def hook(g: Tensor) -> None:
                g2 = g.detach().float().square()
                for i in range(len(self.specs)):
                    d = (self._apply(i, xd) - xd).float()
                    self.scores[i] += 0.5 * n * float((g2 * d.square()).sum())
            x.register_hook(hook)
        elif self.mode == "quant" and self.use >= 0:
            return self._apply(self.use, x)
        return x


class WeightProbe(nn.Module):
    """Between a linear's weight and its op: accumulates N g^2 of that use, or
    returns a fake-quantized weight."""

    def __init__(self):
        super().__init__()
        self.fisher: Tensor | None = None
        self.mode, self.tokens = "off", 0
        self.replacement: Tensor | None = None

    def forward(self, w: Tensor) -> Tensor:
        if self.mode == "score":
            leaf = w.detach().requires_grad_(True)
            n = self.tokens

            def hook(g: Tensor) -> None:
                f = g.detach().float().square() * n
                self.fisher = f if self.fisher is None else self.fisher + f
            leaf.register_hook(hook)
            return leaf
        if self.mode == "quant" and self.replacement is not None:
            return self.replacement
        return w


def _insert_weight_probe(gm: fx.GraphModule, node, probe: WeightProbe, i: int) -> None:
    op, get = weight_use(gm, node)
    name = f"{PROBE_W}{i}"
    gm.add_submodule(name, probe)
    with gm.graph.inserting_before(op):
        p = gm.graph.call_module(name, (get,))
    p.meta = dict(get.meta)
    op.replace_input_with(get, p)


@dataclass
class Sensitivity:
    """Per unit, per choice: the Fisher score (predicted mean-loss increase, nats per
    token); ``base_loss`` on the score windows; ``checks``: (unit key, choice index,
    score, measured loss change) and their Spearman correlation."""

    scores: list[list[float]]
    base_loss: float
    windows: int
    checks: list[tuple[str, int, float, float]] = field(default_factory=list)
    check_base: float | None = None
    spearman: float | None = None

    def to_json(self, space: Space) -> dict:
        return {"base_loss": self.base_loss, "windows": self.windows,
                "units": [{"key": u.key, "linears": list(u.linears), "producer": u.producer,
                           "scores": {space.candidates[c.candidate].text: s
                                      for c, s in zip(u.choices, sc)}}
                          for u, sc in zip(space.units, self.scores)],
                "check": {"base_loss": self.check_base, "spearman": self.spearman,
                          "pairs": [{"unit": k, "candidate": space.candidates[
                              space.units[[u.key for u in space.units].index(k)].choices[
                                  i].candidate].text, "score": s, "measured": m}
                              for k, i, s, m in self.checks]}}


def _loss(gm, ids: Tensor) -> Tensor:
    logits = gm(ids)
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                       ids[:, 1:].reshape(-1))


class Prober:
    """The probes of ``space`` on the plain graph ``gm`` of ``named`` (modifies gm)."""

    def __init__(self, gm: fx.GraphModule, named, space: Space):
        self.gm, self.named, self.space = gm, named, space
        by = named.by_name
        self.acts: dict[str, ActProbe] = {}
        self.act_index: list[list[int]] = []   # unit -> choice -> spec index in its probe
        for u in space.units:
            if u.producer is None:
                self.act_index.append([-1] * len(u.choices))
                continue
            specs: list[TensorSpec] = []
            idx = []
            for c in u.choices:
                if c.activation not in specs:
                    specs.append(c.activation)
                idx.append(specs.index(c.activation))
            self.acts[u.producer] = ActProbe(specs)
            set_activation_module(gm, u.producer, by[u.producer].node, self.acts[u.producer])
            self.act_index.append(idx)
        self.weights: dict[str, WeightProbe] = {}
        for i, n in enumerate(x for u in space.units for x in u.linears):
            self.weights[n] = WeightProbe()
            _insert_weight_probe(gm, by[n], self.weights[n], i)
        gm.recompile()
        self.grad_params = [param(gm, n.weight) for n in named.nodes
                            if n.role == "embedding" and n.weight]

    def _modes(self, mode: str, tokens: int = 0) -> None:
        for p in [*self.acts.values(), *self.weights.values()]:
            p.mode, p.tokens = mode, tokens
            if isinstance(p, ActProbe):
                p.use = -1
            else:
                p.replacement = None

    def _batches(self, windows: Tensor, batch: int, desc: str, progress: bool):
        chunks = list(windows.split(batch))
        return progress_bar(chunks, desc=desc, unit="batch", progress=progress, leave=False)

    @torch.no_grad()
    def observe(self, windows: Tensor, batch: int, progress: bool = True) -> None:
        self._modes("observe")
        for ids in self._batches(windows, batch, "search: observing", progress):
            self.gm(ids)
        for p in self.acts.values():
            p.freeze()
        self._modes("off")

    def score_state(self) -> tuple[dict[str, list[float]], dict[str, Tensor]]:
        """What the score pass accumulated so far: per probed activation, its scores per
        spec; per searched linear, its weight Fisher (``qdsl.search.state`` saves them)."""
        return ({k: list(p.scores) for k, p in self.acts.items()},
                {k: p.fisher for k, p in self.weights.items() if p.fisher is not None})

    def restore_score(self, acts: dict[str, list[float]], fisher: dict[str, Tensor]) -> None:
        """Put back what ``score_state`` returned (a resumed search)."""
        if set(acts) != set(self.acts) or not set(fisher) <= set(self.weights):
            raise ValueError("the saved scores are of other nodes")
        for k, v in acts.items():
            if len(v) != len(self.acts[k].scores):
                raise ValueError(f"the saved scores of {k} are of other specs")
            self.acts[k].scores = list(v)
        for k, f in fisher.items():
            self.weights[k].fisher = f

    def score(self, windows: Tensor, batch: int, progress: bool = True,
              losses: list[float] | None = None, on_batch=None) -> Sensitivity:
        """The Fisher scores. ``losses``: the losses of batches already scored (a resumed
        search: their accumulated scores put back with ``restore_score``), skipped here;
        ``on_batch(losses)`` after each batch (the search saves its state there)."""
        flags = [p.requires_grad for p in self.grad_params]
        for p in self.grad_params:   # activations before the first linear get gradients too
            p.requires_grad_(True)
        losses = list(losses or [])
        chunks = list(windows.split(batch))
        try:
            for ids in progress_bar(chunks[len(losses):], desc="search: scoring", unit="batch",
                                    progress=progress, leave=False, initial=len(losses),
                                    total=len(chunks)):
                self._modes("score", ids.shape[0] * (ids.shape[1] - 1))
                with torch.enable_grad():
                    loss = _loss(self.gm, ids)
                    loss.backward()
                losses.append(float(loss.detach()))
                for p in self.grad_params:
                    p.grad = None
                self._modes("off")
                if on_batch is not None:
                    on_batch(losses)
        finally:
            for p, f in zip(self.grad_params, flags):
                p.requires_grad_(f)
            self._modes("off")
        nb = len(losses)
        scores = []
        by = self.named.by_name
        for u, idx in zip(self.space.units, self.act_index):
            row = []
            for c, ai in zip(u.choices, idx):
                s = self.acts[u.producer].scores[ai] if u.producer else 0.0
                for n in u.linears:
                    s += self._weight_score(by[n], c.weight)
                row.append(s / max(nb, 1))
            scores.append(row)
        return Sensitivity(scores, sum(losses) / max(len(losses), 1), int(windows.shape[0]))

    def _weight_score(self, node, spec: TensorSpec) -> float:
        f = self.weights[node.name].fisher
        if f is None or not spec.quantized and spec.float_dtype == "fp32":
            return 0.0
        w = param(self.gm, node.weight).detach()
        w_hat = oriented(fake_quantize_weight(oriented(w, node.weight_layout), spec)[0],
                         node.weight_layout)
        return 0.5 * float((f * (w_hat - w).float().square()).sum())

    @torch.no_grad()
    def loss(self, windows: Tensor, batch: int) -> float:
        total, n = 0.0, 0
        for ids in windows.split(batch):
            k = ids.shape[0] * (ids.shape[1] - 1)
            total += float(_loss(self.gm, ids)) * k
            n += k
        return total / n

    @torch.no_grad()
    def quantize_only(self, ui: int, ci: int) -> None:
        """Quantize unit ``ui`` with choice ``ci``, everything else float."""
        self._modes("quant")
        u, c = self.space.units[ui], self.space.units[ui].choices[ci]
        if u.producer:
            self.acts[u.producer].use = self.act_index[ui][ci]
        by = self.named.by_name
        for n in u.linears:
            node, w = by[n], param(self.gm, by[n].weight).detach()
            self.weights[n].replacement = oriented(fake_quantize_weight(
                oriented(w, node.weight_layout), c.weight)[0], node.weight_layout)

    def check(self, sens: Sensitivity, windows: Tensor, batch: int, n: int, seed: int = 0,
              progress: bool = True, on_pair=None) -> None:
        """Measure the loss change of ``n`` (unit, choice) pairs spread over the scores.
        Pairs already in ``sens.checks`` (with ``sens.check_base``: a resumed search) are
        not measured again; ``on_pair(sens)`` after the float loss and after each pair."""
        pairs = [(s, ui, ci) for ui, row in enumerate(sens.scores) for ci, s in enumerate(row)
                 if s > 0]
        pairs.sort()
        if not pairs or n <= 0:
            return
        rng = random.Random(seed)
        step = len(pairs) / n
        pick = sorted({min(int(i * step + rng.random() * step), len(pairs) - 1)
                       for i in range(n)})
        self._modes("off")
        if sens.check_base is None:
            sens.check_base = self.loss(windows, batch)
            if on_pair is not None:
                on_pair(sens)
        done = len(sens.checks)
        for j in progress_bar(pick[done:], desc="search: checking", unit="node",
                              progress=progress, leave=False, initial=done, total=len(pick)):
            s, ui, ci = pairs[j]
            self.quantize_only(ui, ci)
            try:
                d = self.loss(windows, batch) - sens.check_base
            finally:
                self._modes("off")
            sens.checks.append((self.space.units[ui].key, ci, s, d))
            if on_pair is not None:
                on_pair(sens)
        sens.spearman = spearman([c[2] for c in sens.checks], [c[3] for c in sens.checks])


def _ranks(x: list[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (ties: mean ranks); None under 3 pairs or no spread."""
    if len(a) < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va and vb else None
