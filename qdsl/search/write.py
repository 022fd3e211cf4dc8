"""An allocation as a recipe a person reads: one rule per (role, clause) with the
blocks as an index set (``block.[0-9,12].mlp.down -> w4 group(size=128)``), weights
and inputs on separate rules (the weight clause on the linears, the activation clause
on the producer of their input), a comment header with the budget, the prediction
and the command. Every searched node is set by exactly one weight rule and one
activation rule, so the cascade has nothing to merge and the plan is the choice
(``chosen_specs``); the rest of the model stays float. Canonical (``qdsl fmt``)."""

from __future__ import annotations

import re
import textwrap

from ..config.spec import TensorSpec
from ..lang.formatter import format_text
from .units import Space

_BLOCK = re.compile(r"^block\.(\d+)\.(.+)$")


def chosen_specs(space: Space, picks) -> dict[str, dict[str, TensorSpec]]:
    """name -> {"weight": spec} and / or {"activation": spec} the allocation sets."""
    out: dict[str, dict[str, TensorSpec]] = {}
    for u, i in zip(space.units, picks):
        c = u.choices[i]
        for n in u.linears:
            out.setdefault(n, {})["weight"] = c.weight
        if u.producer:
            out.setdefault(u.producer, {})["activation"] = c.activation
    return out


def index_set(blocks: list[int]) -> str:
    """``[0-3,7]`` of sorted block indices (``7`` for one block)."""
    parts, i = [], 0
    while i < len(blocks):
        j = i
        while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1:
            j += 1
        parts.append(str(blocks[i]) if i == j else f"{blocks[i]}-{blocks[j]}")
        i = j + 1
    return parts[0] if len(blocks) == 1 else "[" + ",".join(parts) + "]"


def rules(space: Space, picks, n_blocks: int) -> list[str]:
    """``SELECTOR -> CLAUSE`` lines, in the order the roles first appear in the graph."""
    lines: dict[tuple[str, str], list[int | None]] = {}
    order: dict[str, int] = {}  # role -> where it first appears
    for u, i in zip(space.units, picks):
        c = space.candidates[u.choices[i].candidate]
        items = [(n, c.weight_clause()) for n in u.linears]
        if u.producer:
            items.insert(0, (u.producer, c.act_clause()))
        for name, clause in items:
            m = _BLOCK.match(name)
            role, block = (m.group(2), int(m.group(1))) if m else (name, None)
            order.setdefault(role, len(order))
            lines.setdefault((role, clause), []).append(block)
    out = []
    for (role, clause), blocks in sorted(lines.items(), key=lambda kv: (
            order[kv[0][0]], min((b for b in kv[1] if b is not None), default=-1))):
        if blocks == [None]:
            out.append(f"{role} -> {clause}")
            continue
        bs = sorted(b for b in blocks if b is not None)
        where = "*" if bs == list(range(n_blocks)) else index_set(bs)
        out.append(f"block.{where}.{role} -> {clause}")
    return out


def recipe_text(space: Space, picks, n_blocks: int, header: list[str],
                statements: tuple[str, ...] = ()) -> str:
    """The found recipe: header comments, the transform statements (``rotate``) the
    search chose, then the rules, canonically formatted."""
    head = []
    for line in header:  # the command stays on one line: it is copied as a whole
        parts = [line] if line.startswith("Command:") else \
            textwrap.wrap(line, 88, break_on_hyphens=False)
        for part in parts or [""]:
            head.append(f"# {part}".rstrip())
    body = [*statements, *rules(space, picks, n_blocks)]
    return format_text("\n".join(head + [""] + body) + "\n", "<search>")
