"""Checks of the statements about linears (every error located): a `.input` rule's
spec (activation options only) and the transform statements.

``smooth SELECTOR alpha=A`` (SmoothQuant) and ``rotate`` (Hadamard rotation of the
residual stream): docs/language.md, "Transforms"; docs/algorithms.md for the maths.
The checker (``checker.check_document``) calls ``check_transform`` with its reporter
and its selector check.
"""

from __future__ import annotations

from typing import Callable

import re

from ..config.recipe import PORTS, TRANSFORM_PARAMS, Loc, Transform
from ..config.spec import WEIGHT
from .options import OPTIONS
from .parser import did_you_mean
from .presets import preset_text
from .syntax import Option, RuleLine, SelectorNode, TransformLine

_BITS = re.compile(r"([wa])(\d+)")


def check_transform(node: TransformLine, file: str, err: Callable[..., None],
                    check_selector: Callable) -> list[Transform]:
    """``smooth SELECTOR alpha=A`` / ``rotate``: known parameters, each once, in range;
    the defaults filled in (so the formatter prints every parameter)."""
    n = len(err.diags)
    sel = None
    if node.selector is not None:
        sel = check_selector(node.selector, err)
        if sel is not None and sel.port is not None:
            err(node.selector.port_col, f"`{node.kind}` selects the linears whose inputs it "
                f"transforms: drop `.{sel.port}`", f"write `{node.kind} "
                f"{node.selector.text().replace('.' + sel.port, '')}`")
    known = TRANSFORM_PARAMS[node.kind]
    values = dict(known)
    seen: set[str] = set()
    for a in node.params:
        if a.name not in known:
            err(a.col, f"unknown parameter `{a.name}` for `{node.kind}`",
                did_you_mean(a.name, known) or (f"`{node.kind}` takes "
                                                + (", ".join(known) or "no parameters")))
            continue
        if a.name in seen:
            err(a.col, f"parameter `{a.name}` given twice")
            continue
        seen.add(a.name)
        if isinstance(a.value, str) or not 0.0 <= float(a.value) <= 1.0:
            err(a.col, f"`{a.name}` must be a number in [0, 1], got `{a.text.split('=', 1)[1]}`")
            continue
        values[a.name] = float(a.value)
    if len(err.diags) != n:
        return []
    return [Transform(node.kind, sel, tuple(values.items()), Loc(file, node.line, node.col))]


def check_port(node: SelectorNode, err: Callable[..., None]) -> None:
    """The port a selector names, if any, must be a known one."""
    if node.port is not None and node.port not in PORTS:
        err(node.port_col, f"unknown port `.{node.port}`",
            did_you_mean(node.port, PORTS) or "the one port is `.input`: the input of a linear")


def check_port_spec(node: RuleLine, meaning, err: Callable[..., None]) -> bool:
    """A `.input` rule sets one activation (the tensor the linear reads): weight options
    are an error, at the first one written. True when the rule is fine."""
    if node.selector.port is None or meaning.skip or meaning.weight.is_empty():
        return True
    def weighty(o: Option) -> bool:
        d = OPTIONS.get(o.word)
        return (o.target == "w" or (o.word.startswith("w") and bool(_BITS.fullmatch(o.word)))
                or preset_text(o.word) is not None or (d is not None and d.kinds == (WEIGHT,)))
    col = next((o.col for o in node.options if weighty(o)), node.options[0].col)
    err(col, f"weight options on `{node.selector.text()}`: a `.{node.selector.port}` rule "
             "sets the activation the linear reads, which has no weights",
        "write the weight spec in a rule without `.input`, e.g. `type:Linear -> w8`")
    return False
