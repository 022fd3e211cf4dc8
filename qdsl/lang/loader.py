"""Files and includes: text or a path -> a checked ``Recipe``.

``include "x.qrec"`` splices the included file's rules and settings in place.
The path is looked up relative to the including file's directory (the current
directory for text with no file), then in the shipped recipes directory
(``data_dir("recipes")``). Include cycles are errors that show the chain.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Diagnostic, RecipeError
from ..recipe import Recipe, Rule, Settings
from ..resources import data_dir
from .checker import SettingItem, check_document
from .parser import clip, decode, parse_document
from .syntax import IncludeLine

MAX_FILE_BYTES = 4 * 1024 * 1024


@dataclass
class _Result:
    rules: list[Rule] = field(default_factory=list)
    settings: list[SettingItem] = field(default_factory=list)
    diags: list[Diagnostic] = field(default_factory=list)


def parse_recipe(text: str, file: str = "<string>") -> Recipe:
    """Parse and check recipe text (includes resolved); raise ``RecipeError`` with every error."""
    base = Path(file).parent if not file.startswith("<") else Path.cwd()
    out = _Result()
    stack = (Path(file).resolve(),) if not file.startswith("<") else ()
    _compile(text, file, base, stack, out)
    return _finish(out, file, text)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read, parse and check a .qrec file (includes resolved)."""
    text, diags = read_text(Path(path))
    if text is None or any(d.severity == "error" for d in diags):
        raise RecipeError([d for d in diags if d.severity == "error"])
    out = _Result(diags=diags)
    _compile(text, str(path), Path(path).parent, (Path(path).resolve(),), out)
    return _finish(out, str(path), text)


def check_file(path: str | os.PathLike) -> list[Diagnostic]:
    """Every error and warning in a file and the files it includes (empty = clean)."""
    text, diags = read_text(Path(path))
    if text is None:
        return diags
    out = _Result(diags=diags)
    _compile(text, str(path), Path(path).parent, (Path(path).resolve(),), out)
    return out.diags


def read_text(path: Path) -> tuple[str | None, list[Diagnostic]]:
    """Decode a file as UTF-8; unreadable files and invalid bytes become diagnostics."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        return None, [Diagnostic(str(path), 1, 1, f"cannot read recipe: {e.strerror or e}")]
    if len(data) > MAX_FILE_BYTES:
        return None, [Diagnostic(str(path), 1, 1,
                                 f"recipe file is larger than {MAX_FILE_BYTES} bytes")]
    return decode(data, str(path))


def _finish(out: _Result, file: str, text: str) -> Recipe:
    errors = [d for d in out.diags if d.severity == "error"]
    if errors:
        raise RecipeError(errors)
    settings = Settings()
    for s in out.settings:
        settings = settings.then(Settings(**{s.field: s.value}))
    return Recipe(tuple(out.rules), settings, source=file, text=text)


def _compile(text: str, file: str, base: Path, stack: tuple[Path, ...], out: _Result) -> None:
    doc, diags = parse_document(text, file)
    items, check_diags, _ = check_document(doc)
    own, mark = [*diags, *check_diags], len(out.diags)
    for item in items:
        if isinstance(item, Rule):
            out.rules.append(item)
        elif isinstance(item, SettingItem):
            out.settings.append(item)
        else:  # the included file's rules and settings land here, in place
            _include(item, doc.source_line(item.line), file, base, stack, out, own)
    # this file's diagnostics in line order, before those of the files it includes
    out.diags[mark:mark] = sorted(own, key=lambda d: (d.line, d.col))


def _include(node: IncludeLine, src: str, file: str, base: Path, stack: tuple[Path, ...],
             out: _Result, own: list[Diagnostic]) -> None:
    def err(message: str, hint: str | None = None) -> None:
        own.append(Diagnostic(file, node.line, node.path_col, clip(message), hint=hint,
                              source_line=src))

    target = resolve_include(node.path, base)
    if target is None:
        err(f"included file not found: `{node.path}`",
            f"looked in {base} and in the shipped recipes ({_recipes_dir()})")
        return
    key = target.resolve()
    if key in stack:
        chain = " -> ".join(p.name for p in (*stack[stack.index(key):], key))
        err("file includes itself" if stack[-1] == key else f"include cycle: {chain}",
            "remove one of the includes")
        return
    text, diags = read_text(target)
    out.diags.extend(diags)
    if text is not None:
        _compile(text, str(target), target.parent, (*stack, key), out)


def resolve_include(path: str, base: Path) -> Path | None:
    """The file an include names: relative to ``base``, then the shipped recipes dir."""
    candidates = [Path(path)] if Path(path).is_absolute() else [base / path]
    recipes = _recipes_dir()
    if recipes is not None and not Path(path).is_absolute():
        candidates.append(recipes / path)
    return next((c for c in candidates if c.is_file()), None)


def _recipes_dir() -> Path | None:
    try:
        return data_dir("recipes")
    except FileNotFoundError:
        return None
