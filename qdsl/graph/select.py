"""Selector matching: which named graph nodes a recipe selector picks.

Pure string logic over the fields of ``NamedNode`` (name, op, module,
module_type); no torch.

Glob semantics (documented in docs/language.md):
  * segments are separated by '.'; ``*`` matches within one segment
    (``block.*.res_sum``), ``[0-5]`` / ``[0,2,4-6]`` match a block index;
  * a lone ``*`` matches every node;
  * a pattern that does not match a whole name is tried against the part
    after ``block.N.``: ``mlp.c_fc`` means ``block.*.mlp.c_fc``.
"""

from __future__ import annotations

import difflib
import re
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Iterable, Protocol

from ..config.recipe import Selector

# Architecture-neutral aliases: a recipe written for GPT-2's names also selects the
# equivalent parts of a gated (LLaMA) MLP or split attention projections.
ALIASES: dict[str, tuple[str, ...]] = {
    "mlp.up": ("mlp.c_fc",), "mlp.gate": ("mlp.c_fc",), "mlp.down": ("mlp.c_proj",),
    "attn.q": ("attn.qkv",), "attn.k": ("attn.qkv",), "attn.v": ("attn.qkv",),
}
_RANGE = re.compile(r"^\[([0-9,\-\s]+)\]$")
_BLOCK_PREFIX = re.compile(r"^block\.\d+\.")


class Nameable(Protocol):
    name: str
    op: str
    module: str
    module_type: str


@lru_cache(maxsize=4096)
def _segment_matcher(segment: str):
    m = _RANGE.match(segment)
    if m:
        allowed: set[int] = set()
        for part in m.group(1).split(","):
            part = part.strip()
            lo, _, hi = part.partition("-")
            allowed.update(range(int(lo), int(hi or lo) + 1))
        return lambda s: s.isdigit() and int(s) in allowed
    return lambda s: fnmatchcase(s, segment)


def _glob_whole(pattern: str, name: str) -> bool:
    pats, parts = pattern.split("."), name.split(".")
    return len(pats) == len(parts) and all(_segment_matcher(p)(s) for p, s in zip(pats, parts))


def aliases(name: str) -> tuple[str, ...]:
    """``aliases('block.3.mlp.up') -> ('block.3.mlp.up', 'block.3.mlp.c_fc')``."""
    m = _BLOCK_PREFIX.match(name)
    if not m:
        return (name,)
    return (name,) + tuple(m.group(0) + a for a in ALIASES.get(name[m.end():], ()))


def _glob_one(pattern: str, name: str) -> bool:
    if _glob_whole(pattern, name):
        return True
    m = _BLOCK_PREFIX.match(name)
    return bool(m) and _glob_whole(pattern, name[m.end():])


def glob_matches(pattern: str, name: str) -> bool:
    """``glob_matches('mlp.c_fc', 'block.3.mlp.c_fc') -> True``; also true for
    ``block.3.mlp.up`` (an alias, see ALIASES)."""
    return pattern == "*" or any(_glob_one(pattern, n) for n in aliases(name))


def _linear_like(node: Nameable) -> bool:
    return node.op == "linear"


def selector_matches(sel: Selector, node: Nameable) -> bool:
    if sel.kind == "glob":
        return glob_matches(sel.pattern, node.name)
    if sel.kind == "op":
        return fnmatchcase(node.op, sel.pattern)
    if sel.kind == "type":
        # `type:Linear` also picks GPT-2's Conv1D and any module computing a linear op:
        # users mean "the linear layers", whatever class implements them.
        return fnmatchcase(node.module_type, sel.pattern) or (
            sel.pattern == "Linear" and _linear_like(node))
    if sel.kind == "module":
        return fnmatchcase(node.module, sel.pattern)
    if sel.kind == "re":
        return re.fullmatch(sel.pattern, node.name) is not None
    raise AssertionError(f"unknown selector kind {sel.kind!r}")


def select(sel: Selector, nodes: Iterable[Nameable]) -> list:
    return [n for n in nodes if selector_matches(sel, n)]


def suggestions(sel: Selector, nodes: Iterable[Nameable], n: int = 3) -> list[str]:
    """Closest existing names for a selector that matched nothing ('did you mean')."""
    nodes = list(nodes)
    if sel.kind == "op":
        pool = sorted({x.op for x in nodes})
    elif sel.kind == "type":
        pool = sorted({x.module_type for x in nodes})
    elif sel.kind == "module":
        pool = sorted({x.module for x in nodes})
    else:
        names = {x.name for x in nodes}
        pool = sorted(names | {_BLOCK_PREFIX.sub("", x) for x in names})
    pattern = sel.pattern.replace("*", "0") if sel.kind != "re" else sel.pattern
    return difflib.get_close_matches(pattern, pool, n=n, cutoff=0.5)
