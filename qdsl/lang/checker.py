"""Concrete syntax tree -> checked rules and settings (every semantic error, located).

How a spec's options bind to tensors (docs/language.md, "which tensor an
option applies to"):

* ``wN`` / ``aN`` set the bits of weights / activations and make that kind
  *current*; a preset (``w8a8``) sets both and leaves no kind current.
* An option valid for one kind only binds to that kind wherever it is written
  (``per_group`` -> activations, ``per_channel`` -> weights).
* An option valid for both binds to the ``w.`` / ``a.`` prefix if written,
  else to the current kind; with neither, ``fp16``/``bf16``/``fp32`` apply to
  both kinds and anything else is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import Diagnostic
from ..config.recipe import SETTING_CHOICES, SETTING_KEYS, Loc, Rule, Selector, Transform
from ..config.spec import ACTIVATION, FLOAT_BITS, MAX_BITS, MIN_BITS, WEIGHT, PerToken, SpecError, TensorPatch
from .options import OPTIONS, SLOT_NAMES, OptionDef, kind_name, kinds_phrase
from .parser import did_you_mean, clip
from .presets import PRESETS, preset_options, preset_text
from .linears import check_port_spec, check_transform
from .selectors import check_selector
from .syntax import Document, IncludeLine, Option, RuleLine, SelectorNode, SettingLine, TransformLine

_BITS = re.compile(r"([wa])(\d+)")
ALL_WORDS = sorted([*OPTIONS, *PRESETS, "skip", "observer"])


@dataclass(frozen=True)
class SettingItem:
    key: str
    field: str
    value: Any
    loc: Loc


@dataclass(frozen=True)
class SpecMeaning:
    """What one spec says: the two patches, skip, and the preset word it used (if any)."""

    weight: TensorPatch
    activation: TensorPatch
    skip: bool = False
    preset: str | None = None


@dataclass
class _Reporter:
    doc: Document
    line: int
    diags: list[Diagnostic] = field(default_factory=list)

    def __call__(self, col: int, message: str, hint: str | None = None,
                 severity: str = "error") -> None:
        self.diags.append(Diagnostic(self.doc.file, self.line, col, clip(message), severity,
                                     hint and clip(hint), self.doc.source_line(self.line)))


def check_document(doc: Document) -> tuple[list[Rule | SettingItem | IncludeLine | Transform],
                                           list[Diagnostic], dict[int, SpecMeaning]]:
    """Check every statement; return the items in order, all diagnostics, and
    each rule's meaning by line number (the formatter prints from it)."""
    items: list[Rule | SettingItem | IncludeLine] = []
    diags: list[Diagnostic] = []
    meanings: dict[int, SpecMeaning] = {}
    seen_keys: dict[str, int] = {}
    for node in doc.lines:
        err = _Reporter(doc, getattr(node, "line", 0))
        if isinstance(node, RuleLine):
            sel = check_selector(node.selector, err)
            meaning = interpret_spec(node.options, err)
            if sel and meaning and check_port_spec(node, meaning, err) and not err.diags:
                meanings[node.line] = meaning
                items.append(Rule(sel, meaning.weight, meaning.activation, meaning.skip,
                                  Loc(doc.file, node.line, node.selector.col)))
        elif isinstance(node, SettingLine):
            item = check_setting(node, doc.file, err)
            if item:
                if item.key in seen_keys:
                    err(node.key_col, f"`{item.key}` is set twice in this file (line "
                        f"{seen_keys[item.key]} and here); the later value wins",
                        severity="warning")
                seen_keys[item.key] = node.line
                items.append(item)
        elif isinstance(node, (IncludeLine, TransformLine)):  # transforms: lang.linears
            items.extend([node] if isinstance(node, IncludeLine)
                         else check_transform(node, doc.file, err, check_selector))
        diags.extend(err.diags)
    return items, diags, meanings


# --------------------------------------------------------------------------
# Specs.


def interpret_spec(options: tuple[Option, ...], err: _Reporter) -> SpecMeaning | None:
    """Bind each option to weights / activations; None if the spec has errors."""
    n = len(err.diags)
    state = _SpecState(err)
    skip = [o for o in options if o.word == "skip" and not o.key]
    if skip:
        o = skip[0]
        if o.target or o.args is not None:
            err(o.col, "`skip` takes no prefix or arguments")
        for other in options:
            if other is not o:
                err(other.col, "`skip` cannot be combined with other options",
                    "skip keeps the node entirely in float; remove the other options")
        return SpecMeaning(TensorPatch(), TensorPatch(), skip=True) if len(err.diags) == n \
            else None
    preset = None
    for o in options:
        if preset_text(o.word) is not None and not o.key and o.target is None and o.args is None:
            preset = preset or o.word
            state.current = None
            for p in preset_options(o.word):
                state.option(p, shown=o, col=o.col)
            state.current = None
        else:
            state.option(o, shown=o, col=o.col)
    state.finish()
    if len(err.diags) != n:
        return None
    try:
        return SpecMeaning(state.patch(WEIGHT), state.patch(ACTIVATION), preset=preset)
    except SpecError as e:  # defensive: the checks above should make this unreachable
        err(options[0].col, str(e))
        return None


class _SpecState:
    def __init__(self, err: _Reporter):
        self.err = err
        self.current: str | None = None
        # kind -> slot -> (value, option text, column)
        self.slots: dict[str, dict[str, tuple[Any, str, int]]] = {WEIGHT: {}, ACTIVATION: {}}

    def option(self, o: Option, shown: Option, col: int) -> None:
        err, text = self.err, shown.text()
        bits = _BITS.fullmatch(o.word)
        if bits and not o.key:
            if o.target:
                err(col, f"a bit width takes no `{o.target}.` prefix", f"write `{o.word}`")
                return
            if o.args is not None:
                err(col, f"`{o.word}` takes no arguments")
                return
            kind = WEIGHT if bits.group(1) == "w" else ACTIVATION
            value = int(bits.group(2)) if len(bits.group(2)) <= 4 else 10 ** 6
            try:  # the range is the spec's to check (TensorPatch); here it gets a location
                TensorPatch(bits=value)
            except SpecError:
                err(col, f"{kind} bits must be "
                         f"{MIN_BITS}..{MAX_BITS}, or {FLOAT_BITS} to keep float; got `{text}`")
                return
            self.set(kind, "precision", {"bits": value}, text, col)
            self.current = kind
            return
        d = self._definition(o, col)
        if d is None:
            return
        kwargs = self._args(d, o, col)
        if kwargs is None:
            return
        try:
            value = d.build(**kwargs)
        except SpecError as e:
            err(col, str(e))
            return
        for kind in self._targets(d, o, col):
            self.set(kind, d.slot, value, text, col)

    def _definition(self, o: Option, col: int) -> OptionDef | None:
        err = self.err
        if preset_text(o.word) is not None:
            err(col, f"preset `{o.word}` takes no prefix, key or arguments",
                f"write `{o.word}` on its own")
            return None
        d = OPTIONS.get(o.word)
        if o.key is not None:
            if o.key != "observer":
                err(col, f"unknown key `{o.key}=`",
                    did_you_mean(o.key, ["observer"]) or "only `observer=NAME` is accepted")
                return None
            if d is not None and not d.is_observer:
                err(o.word_col, f"`{o.word}` is not an observer",
                    "observers are minmax, current_minmax, running_minmax, mse and percentile")
                return None
        if d is None:
            err(o.word_col, f"unknown option `{o.word}`",
                did_you_mean(o.word, ALL_WORDS) or "see docs/language.md for the spec words")
        return d

    def _args(self, d: OptionDef, o: Option, col: int) -> dict[str, Any] | None:
        err, out, ok = self.err, {}, True
        args = o.args or ()
        if o.args is not None and not d.args:
            err(col, f"`{d.word}` takes no arguments", f"write `{d.word}`")
            return None
        names = {a.name: a for a in d.args}
        for i, a in enumerate(args):
            if a.name is None and a.value is None:  # a bare word: a flag
                spec = names.get(a.text)
                if spec is None or not spec.is_flag:
                    _unknown_arg(err, d, a.text, a.col)
                    ok = False
                    continue
                name, value = a.text, True
            elif a.name is None:  # positional number
                if i >= d.positional:
                    err(a.col, f"`{d.word}` takes at most {d.positional} positional "
                               f"argument{'s' if d.positional != 1 else ''}",
                        f"name it, e.g. `{d.example}`")
                    ok = False
                    continue
                name, value = d.args[i].name, a.value
            else:
                spec = names.get(a.name)
                if spec is None:
                    _unknown_arg(err, d, a.name, a.col)
                    ok = False
                    continue
                if spec.is_flag:
                    err(a.col, f"`{a.name}` is a flag: write `{a.name}` without a value")
                    ok = False
                    continue
                name, value = a.name, a.value
            if name in out:
                err(a.col, f"argument `{name}` given twice")
                ok = False
                continue
            check = names[name].check
            problem = check(value) if check is not None else None
            if problem is not None:
                err(a.col, problem)
                ok = False
            out[name] = value
        for spec in d.args:
            if spec.required and spec.name not in out and ok:
                err(col, f"`{d.word}` needs {spec.name}", f"e.g. `{d.example}`")
                ok = False
        return out if ok else None

    def _targets(self, d: OptionDef, o: Option, col: int) -> tuple[str, ...]:
        if o.target is not None:
            kind = WEIGHT if o.target == "w" else ACTIVATION
            if kind not in d.kinds:
                self.err(col, f"`{d.word}` applies to {kinds_phrase(d.kinds)}",
                         f"drop the `{o.target}.` prefix")
                return ()
            return (kind,)
        if len(d.kinds) == 1:
            return d.kinds
        if self.current is not None:
            return (self.current,)
        if d.slot == "precision":
            return (WEIGHT, ACTIVATION)
        self.err(col, f"`{d.word}` applies to weights and activations: say which",
                 f"write w.{d.word} or a.{d.word}, or put it after `w8` / `a8`")
        return ()

    def set(self, kind: str, slot: str, value: Any, text: str, col: int) -> None:
        have = self.slots[kind]
        if slot in have:
            old_text = have[slot][1]
            if old_text == text:
                self.err(col, f"`{text}` is given twice for the {kind_name(kind)}")
            else:
                self.err(col, f"`{text}` conflicts with `{old_text}`: both set the "
                              f"{kind_name(kind)}' {SLOT_NAMES[slot]}",
                         "one rule sets each attribute once; a later rule may override it")
            return
        have[slot] = (value, text, col)

    def finish(self) -> None:
        act = self.slots[ACTIVATION]
        if isinstance(act.get("granularity", (None,))[0], PerToken) and \
                act.get("dynamic", (None,))[0] is False:
            _, text, col = act["dynamic"]
            self.err(col, f"`{text}` conflicts with `per_token`: per-token activation scales "
                          "are always dynamic", "drop `static`")

    def patch(self, kind: str) -> TensorPatch:
        s = {k: v[0] for k, v in self.slots[kind].items()}
        return TensorPatch(**s.pop("precision", {}), **s)  # precision: bits or float_dtype


def _unknown_arg(err: _Reporter, d: OptionDef, name: str, col: int) -> None:
    choices = [a.name for a in d.args]
    hint = did_you_mean(name, choices) or f"`{d.word}` takes {', '.join(choices)}"
    err(col, f"unknown argument `{name}` for `{d.word}`", hint)


# --------------------------------------------------------------------------
# Settings.


def check_setting(node: SettingLine, file: str, err: _Reporter) -> SettingItem | None:
    key = node.key
    if key not in SETTING_KEYS:
        return err(node.key_col, f"unknown setting `{key}`", did_you_mean(key, list(SETTING_KEYS))
                   or f"settings are {', '.join(SETTING_KEYS)}")
    fname, typ = SETTING_KEYS[key]
    v, col = node.value, node.value_col
    if typ is int:
        if node.value_kind != "number" or not isinstance(v, int):
            return err(col, f"`{key}` must be an integer, got `{_show(node)}`")
        low = 0 if key == "calib.seed" else 1
        if v < low:
            return err(col, f"`{key}` must be >= {low}, got {v}")
    elif key in SETTING_CHOICES:  # export: the word compressed_tensors (or "compressed-tensors")
        allowed, v = SETTING_CHOICES[key], str(v).replace("_", "-") if key == "export" else v
        if node.value_kind == "number" or v not in allowed:
            return err(col, f"`{key}` must be one of {', '.join(allowed)}, got `{_show(node)}`",
                       did_you_mean(str(v), allowed))
    elif typ not in (int, str):  # a checking converter (config/student.py), ValueError
        try:
            v = typ(v, node.value_kind)
        except ValueError as e:
            return err(col, str(e))
    elif node.value_kind != "string":
        return err(col, f"`{key}` must be a quoted string, got `{_show(node)}`",
                   f'write set {key} = "{v}"')
    return SettingItem(key, fname, v, Loc(file, node.line, node.col))


def _show(node: SettingLine) -> str:
    return f'"{node.value}"' if node.value_kind == "string" else str(node.value)
