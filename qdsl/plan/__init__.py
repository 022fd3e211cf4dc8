"""Recipe x named graph -> QuantPlan: the resolved weight and activation spec of
every named node, and the rule (file:line:col) that decided each attribute.

The cascade: rules apply in order; a rule sets only the attributes it names, and
a later rule overrides them. ``skip`` sets both tensors back to float.

Errors (PlanError, located at the rule): a rule that matches nothing (unless
optional), weight options on a rule none of whose nodes has weights. Warnings:
a rule whose every attribute on every node it matched is overridden later
("shadowed"), naming the rules that override it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import Diagnostic, PlanError
from ..config.recipe import Recipe, Rule
from ..graph.inputs import fold_target
from ..graph.select import select, suggestions
from ..config.rounding import RTN
from .diagnostics import _diag, _ineffective, _patches, _shadowed
from ..config.spec import (ACTIVATION, WEIGHT, SpecError, TensorPatch,
                          TensorSpec, format_option, resolve)

_PATCH_FIELDS = tuple(f.name for f in fields(TensorPatch))


@dataclass(frozen=True)
class PlanEntry:
    """One named node's resolved quantization. ``weight`` is None for nodes without weights."""

    name: str
    role: str
    module: str
    weight: TensorSpec | None
    activation: TensorSpec
    # tensor kind -> attribute -> the rule location that set it last
    decided_by: dict[str, dict[str, str]] = field(default_factory=dict, compare=False)

    def rule(self, kind: str) -> str:
        """The rule that decided this tensor's precision; where no rule set it, the last
        rule that set anything ('-' when no rule touched it). ``decided_by`` lists the
        attributes in rule order."""
        d = self.decided_by.get(kind, {})
        return d.get("bits") or d.get("float_dtype") or (list(d.values())[-1] if d else "-")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "module": self.module,
                "weight": self.weight.to_json() if self.weight else None,
                "activation": self.activation.to_json(),
                "decided_by": self.decided_by}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PlanEntry:
        return cls(name=d["name"], role=d["role"], module=d["module"],
                   weight=TensorSpec.from_json(d["weight"]) if d["weight"] else None,
                   activation=TensorSpec.from_json(d["activation"]),
                   decided_by=d.get("decided_by", {}))


@dataclass(frozen=True)
class PlannedTransform:
    """A transform fitted to the graph (passes.transform applies it). ``smooth``: one
    group of linears reading one tensor: the ``producer`` of that tensor, where the
    scale folds (``fold_kind`` "norm" | "linear", node ``fold``), the ``consumers``
    (canonical names, graph order) and ``alpha``. ``rotate``: the other fields empty."""

    kind: str
    loc: str
    alpha: float = 0.0
    producer: str = ""
    fold: str = ""
    fold_kind: str = ""
    consumers: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "consumers": list(self.consumers)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PlannedTransform:
        return cls(**{**d, "consumers": tuple(d["consumers"])})


@dataclass(frozen=True)
class QuantPlan:
    """The portable result of matching: entries in graph order, plus what graph they fit."""

    entries: tuple[PlanEntry, ...]
    graph_hash: str
    module_map: dict[str, str]
    recipe_hash: str
    warnings: tuple[Diagnostic, ...] = ()
    transforms: tuple[PlannedTransform, ...] = ()  # in recipe order

    def __getitem__(self, name: str) -> PlanEntry:
        return self._by_name()[name]

    def _by_name(self) -> dict[str, PlanEntry]:
        return {e.name: e for e in self.entries}

    def quantized(self) -> list[PlanEntry]:
        return [e for e in self.entries
                if (e.weight is not None and e.weight.quantized) or e.activation.quantized]

    def check_graph(self, named, same_model: bool = False) -> None:
        """Refuse to apply this plan to a graph it was not made for. ``same_model``:
        the caller has checked the weights are the ones planned for and re-captured
        them with another static cache length (which changes the graph's constants,
        hence its hash): then every planned node must exist by name instead."""
        if same_model:
            missing = [e.name for e in self.entries if e.name not in named.by_name]
            why = (f"{len(missing)} planned node(s) missing (e.g. {missing[:3]})" if missing
                   else "the module map differs" if named.module_map != self.module_map
                   else None)
            if why:
                raise PlanError([Diagnostic(
                    "<plan>", 1, 1, f"plan does not fit this capture of its model: {why}")])
            return
        if named.graph_hash != self.graph_hash:
            raise PlanError([Diagnostic(
                "<plan>", 1, 1, f"plan was made for graph {self.graph_hash}, "
                f"not {named.graph_hash}: re-run explain/compile against this model")])

    def to_json(self) -> dict[str, Any]:
        extra = {"transforms": [t.to_json() for t in self.transforms]} if self.transforms else {}
        return {"graph_hash": self.graph_hash, "recipe_hash": self.recipe_hash,
                "module_map": self.module_map, "entries": [e.to_json() for e in self.entries],
                **extra}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> QuantPlan:
        return cls(entries=tuple(PlanEntry.from_json(e) for e in d["entries"]),
                   graph_hash=d["graph_hash"], module_map=d["module_map"],
                   recipe_hash=d["recipe_hash"], transforms=tuple(
                       PlannedTransform.from_json(t) for t in d.get("transforms", ())))

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def _input_producers(rule: Rule, recipe: Recipe, hits: list, named, errors: list[Diagnostic],
                     warnings: list[Diagnostic]) -> list | None:
    """A `.input` rule's targets: the producers (named nodes whose outputs the matched
    linears read, ``named.inputs``), each once, in graph order. None after an error:
    no linear matched, a linear reads no named node's output, or a tensor that several
    linears read is selected for only some of them. An optional rule skips the linears
    whose input has no producer. Warns when a producer's output has other readers."""
    inputs = getattr(named, "inputs", {})
    sel = f"`{rule.selector.text()}`"
    linears = [n for n in hits if n.role == "linear"]
    if not linears:
        if not rule.selector.optional:
            ex = hits[0]
            errors.append(_diag(rule, recipe, f"{sel} sets the input of linears, and none of the "
                                f"{len(hits)} node(s) it matches is one (e.g. `{ex.name}`, "
                                f"{ex.role})", hint="`.input` applies to linears; drop it to "
                                "quantize these nodes' outputs"))
        return None
    lost = [n for n in linears if getattr(inputs.get(n.name), "producer", None) is None]
    if lost and not rule.selector.optional:
        via = inputs.get(lost[0].name)
        errors.append(_diag(
            rule, recipe, f"{sel}: the input of `{lost[0].name}` is not the output of a named "
            "node" + (f" (it is fx node {via.via})" if via else "") + ", so no quantizer can "
            "sit on it" + (f"; nor can the inputs of {len(lost) - 1} more" if len(lost) > 1
                           else ""),
            hint="narrow the selector, or mark the rule optional (`?`) to set the inputs "
                 "that have a producer"))
        return None
    chosen = {n.name for n in linears}
    producers: dict[str, object] = {}
    for n in linears:
        li = inputs.get(n.name)
        if li is None or li.producer is None:
            continue
        left_out = [r for r in li.readers if r in inputs and r not in chosen]
        if left_out:
            errors.append(_diag(
                rule, recipe, f"{sel}: the input of `{n.name}` is one tensor (the output of "
                f"`{li.producer}`) with the input of {', '.join(f'`{r}`' for r in left_out)}, "
                "which this rule does not select",
                hint="a `.input` rule quantizes the tensor for every linear reading it: "
                     "select them all (e.g. `attn.*.input`), or quantize none"))
            return None
        others = [r for r in li.readers if r not in inputs]
        if others and li.producer not in producers:
            warnings.append(_diag(
                rule, recipe, f"{sel}: the input of `{n.name}` is the output of "
                f"`{li.producer}`, which {', '.join(others)} also read(s): they read the "
                "quantized tensor too", severity="warning",
                hint="qdsl quantizes a node's output once for all its readers"))
        producers.setdefault(li.producer, named.by_name[li.producer])
    return sorted(producers.values(), key=lambda p: named.nodes.index(p))


def plan_transforms(recipe: Recipe, named, errors: list[Diagnostic]) -> tuple:
    """Fit each transform statement to the graph. ``smooth SEL``: the linears SEL
    matches, grouped by the tensor they read; every group must hold all the linears
    reading that tensor (one scale s for all: q/k/v, gate/up) and have a producer the
    scale folds into (``graph.inputs.fold_target``) read by nothing else; with `?`,
    groups that do not fit are left out instead of being errors."""
    out = []
    for t in recipe.transforms:
        if t.kind != "smooth":
            out.append(PlannedTransform(t.kind, str(t.loc)))
            continue
        sel, inputs = t.selector, getattr(named, "inputs", {})
        hits = [n for n in select(sel, named.nodes) if n.role == "linear"]
        chosen, groups, bad = {n.name for n in hits}, {}, []
        for n in hits:
            li = inputs.get(n.name)
            why = ("its input is not the output of a named node" if li is None
                   or li.producer is None else None)
            if why is None:
                others = [r for r in li.readers if r not in chosen]
                fold = fold_target(named, li.producer)
                why = (f"its input (the output of `{li.producer}`) is also read by "
                       f"{', '.join(f'`{r}`' for r in others)}, which this statement does not "
                       "select: one scale is shared by every reader" if others
                       else fold if isinstance(fold, str) else None)
            if why is not None:
                bad.append((n.name, why))
                continue
            g = groups.setdefault(li.producer, (fold, []))
            g[1].append(n.name)
        if not hits and not sel.optional:
            bad.append(("", f"no linear matches `{sel.text()}`"))
        if bad and not sel.optional:
            name, why = bad[0]
            errors.append(_diag(t, recipe, f"smooth `{sel.text()}`: cannot smooth "
                                + (f"`{name}`: {why}" if name else why)
                                + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""),
                                hint="narrow the selector, or mark it optional (`?`) to "
                                     "smooth only the groups that fit"))
            continue
        for producer, ((kind, fold), consumers) in groups.items():
            out.append(PlannedTransform("smooth", str(t.loc), t.param("alpha"), producer,
                                        fold, kind, tuple(consumers)))
    return tuple(out)


def build_plan(recipe: Recipe, named) -> QuantPlan:
    """Match ``recipe`` against ``named`` (a NamedGraph). Raises PlanError listing every error."""
    nodes = list(named.nodes)
    errors: list[Diagnostic] = []
    # per node: kind -> accumulated patch; kind -> field -> rule index
    acc = {n.name: {WEIGHT: TensorPatch(), ACTIVATION: TensorPatch()} for n in nodes}
    owner: dict[str, dict[str, dict[str, int]]] = {n.name: {WEIGHT: {}, ACTIVATION: {}}
                                                   for n in nodes}
    matched: list[list] = []
    port_warnings: list[Diagnostic] = []
    for i, rule in enumerate(recipe.rules):
        hits = select(rule.selector, nodes)
        if hits and rule.selector.port == "input":
            hits = _input_producers(rule, recipe, hits, named, errors, port_warnings)
            if hits is None:
                matched.append([])
                continue
        matched.append(hits)
        if not hits and rule.selector.port and rule.selector.optional:
            continue
        if not hits:
            if not rule.selector.optional:
                near = suggestions(rule.selector, nodes)
                errors.append(_diag(
                    rule, recipe,
                    f"selector `{rule.selector.text()}` matches no node of this model",
                    hint=(f"did you mean {', '.join(f'`{s}`' for s in near)}? " if near else "")
                    + "mark the rule optional with a trailing `?` if that is intended"))
            continue
        if not rule.skip and not rule.weight.is_empty() and not any(n.has_weight for n in hits):
            ex = hits[0]
            errors.append(_diag(
                rule, recipe, f"weight options on `{ex.name}` ({ex.role}), which has no weights"
                + (f" (nor do the other {len(hits) - 1} matched nodes)" if len(hits) > 1 else ""),
                hint="weights exist on linears and embeddings; use `a..` options here"))
            continue
        for n in hits:
            for kind, patch in _patches(rule).items():
                if kind == WEIGHT and not n.has_weight:
                    continue
                acc[n.name][kind] = acc[n.name][kind].then(patch)
                for f in patch.overrides():  # a precision replaced is owned by no one
                    owner[n.name][kind].pop(f, None)
                for f in patch.set_fields():
                    owner[n.name][kind][f] = i
    transforms = plan_transforms(recipe, named, errors)
    if errors:
        raise PlanError(errors)

    locs = [str(r.loc) for r in recipe.rules]
    entries, asked = [], set()  # asked: rules already reported for rounding float weights
    for n in nodes:
        decided = {k: {f: locs[i] for f, i in sorted(owner[n.name][k].items(), key=lambda fi: fi[1])}
                   for k in (WEIGHT, ACTIVATION)}  # in rule order: the last one set last
        try:  # fields set by different rules may not fit (1-bit sign codes with gptq)
            weight = resolve(WEIGHT, acc[n.name][WEIGHT]) if n.has_weight else None
        except SpecError as e:
            i = owner[n.name][WEIGHT].get("rounding", len(recipe.rules) - 1)
            errors.append(_diag(recipe.rules[i], recipe, f"{n.name}: {e}"))
            continue
        bad = _rounding_on_float(n.name, acc[n.name][WEIGHT], weight, owner[n.name][WEIGHT])
        if bad is not None and bad not in asked:
            asked.add(bad)
            what = format_option(acc[n.name][WEIGHT].rounding)
            errors.append(_diag(recipe.rules[bad], recipe, f"`{what}` on {n.name}, whose "
                                "weights stay float", hint="give the weights a bit width "
                                "(w4, w8) in this rule or an earlier one"))
        entries.append(PlanEntry(
            name=n.name, role=n.role, module=n.module, weight=weight,
            activation=resolve(ACTIVATION, acc[n.name][ACTIVATION]),
            decided_by={k: v for k, v in decided.items() if v}))
    if errors:
        raise PlanError(errors)
    warnings = tuple(port_warnings) + tuple(_shadowed(recipe, matched, owner)) + tuple(
        _ineffective(recipe, matched, {e.name: e for e in entries}))
    return QuantPlan(entries=tuple(entries), graph_hash=named.graph_hash,
                     module_map=dict(named.module_map), recipe_hash=recipe.hash(),
                     warnings=warnings, transforms=transforms)


def _rounding_on_float(name: str, patch: TensorPatch, spec: TensorSpec | None,
                       owner: dict[str, int]) -> int | None:
    """The rule that asked for GPTQ / AWQ on weights that end up float, when it came at
    or after the rule that made them float (or no rule gave them bits): a later `skip`
    of a node is fine, `* -> fp16` then `mlp.* -> gptq` is not."""
    if spec is None or spec.quantized or patch.rounding is None or isinstance(patch.rounding, RTN):
        return None
    i = owner["rounding"]
    return i if i >= owner.get("bits", owner.get("float_dtype", -1)) else None
