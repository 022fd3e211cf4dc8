"""Selectors -> checked ``Selector`` s: glob segments and index sets, op / type
patterns, regexes (at the regex's column), ports (``lang.linears.check_port``)."""

from __future__ import annotations

import re
from typing import Any

from ..config.recipe import Selector
from .linears import check_port
from .syntax import SelectorNode

_RANGE_SET = re.compile(r"\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*")
_SEGMENT = re.compile(r"(?:[A-Za-z0-9_*]|\[[^\]]*\])+")
_Reporter = Any  # checker._Reporter: err(col, message, hint=None), err.diags


def check_selector(node: SelectorNode, err: _Reporter) -> Selector | None:
    n = len(err.diags)
    if node.kind in ("glob", "module"):
        _check_glob(node.pattern, node.pattern_col, err, node.kind)
    elif node.kind in ("op", "type"):
        if not node.pattern:
            example = "op:softmax" if node.kind == "op" else "type:Linear"
            err(node.col, f"empty `{node.kind}:` selector", f"e.g. `{example}`")
    else:
        try:
            re.compile(node.pattern)
        except re.error as e:
            err(node.pattern_col + (e.pos or 0), f"invalid regular expression: {e.msg}")
        except (RecursionError, OverflowError, ValueError, MemoryError):
            err(node.pattern_col, "regular expression is too complex to compile")
    check_port(node, err)
    return Selector(node.kind, node.pattern, node.optional, node.port) if len(err.diags) == n else None


def _check_glob(pattern: str, col: int, err: _Reporter, kind: str) -> None:
    if not pattern:
        err(col, "empty `module:` selector", "e.g. `module:transformer.h.*.mlp.c_fc`")
        return
    start = 0
    for seg in _split_segments(pattern):
        where = col + start
        if not seg:
            err(where, f"empty name segment in selector `{pattern}`",
                "segments are separated by single dots: `block.*.res_sum`")
            return
        if not _SEGMENT.fullmatch(seg):
            err(where, f"malformed selector segment `{seg}`")
            return
        for m in re.finditer(r"\[([^\]]*)\]", seg):
            _check_index_set(m.group(1), where + m.start(), err)
        start += len(seg) + 1


def _split_segments(pattern: str) -> list[str]:
    segs, depth, cur = [], 0, []
    for ch in pattern:
        if ch == "." and depth == 0:
            segs.append("".join(cur))
            cur = []
            continue
        depth += ch == "["
        depth -= ch == "]"
        cur.append(ch)
    segs.append("".join(cur))
    return segs


def _check_index_set(body: str, col: int, err: _Reporter) -> None:
    if not _RANGE_SET.fullmatch(body):
        err(col, f"bad index set `[{body}]`",
            "write numbers and ranges, e.g. `[0-5]` or `[0,2,4-6]`")
        return
    for part in body.split(","):
        lo, _, hi = part.partition("-")
        if hi and int(lo) > int(hi):
            err(col, f"bad index range `{part}`: {lo} is greater than {hi}")
