"""Files and includes: text or a path -> a checked ``Recipe``.

``include "x.qrec"`` splices the included file's rules and settings in place.
The path is looked up relative to the including file's directory (the current
directory for text with no file), then in the shipped recipes directory
(``data_dir("recipes")``). Include cycles are errors that show the chain.

Only recipe files are read, so an include cannot be used to print another file
in error messages: the name written and the file it resolves to (through
symlinks) must end in ``.qrec``, and the file must be a regular file, checked
with ``stat`` before it is opened (a FIFO, a device, a directory is refused
without opening it; it is then opened non-blocking and checked again with
``fstat`` in case it was swapped). Every file read (the top-level one too) is at
most ``MAX_FILE_BYTES``, and one holding a NUL byte or invalid UTF-8 is refused
with one line, ``not a recipe file (binary)``, without echoing its content.
Includes nest at most ``MAX_INCLUDE_DEPTH`` deep and one load reads at most
``MAX_INCLUDED_FILES`` files (a file including the next one twice, 30 deep,
would otherwise splice in 2**30 copies).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Diagnostic, RecipeError
from ..config.recipe import Recipe, Rule, Settings, Transform
from ..resources import data_dir
from .checker import SettingItem, check_document
from .exportrules import rule_diagnostics
from .parser import clip, parse_document
from .syntax import IncludeLine

MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_INCLUDE_DEPTH = 32
MAX_INCLUDED_FILES = 256
RECIPE_SUFFIX = ".qrec"


@dataclass
class _Result:
    rules: list[Rule] = field(default_factory=list)
    transforms: list[Transform] = field(default_factory=list)
    settings: list[SettingItem] = field(default_factory=list)
    diags: list[Diagnostic] = field(default_factory=list)
    files: int = 0  # included files read so far (MAX_INCLUDED_FILES)


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
    return out.diags + _export_diags(out, str(path), text)


def read_text(path: Path) -> tuple[str | None, list[Diagnostic]]:
    """A recipe file's text, or None and one diagnostic saying why it is not one.

    Refused without opening: a missing or unreadable path, anything but a regular
    file (FIFO, device, directory, socket), a file over ``MAX_FILE_BYTES``. Refused
    after reading, without echoing the content: a NUL byte or invalid UTF-8
    (``not a recipe file (binary)``, located at the first bad byte).
    """
    data, problem = read_recipe_bytes(path)
    if data is None:
        return None, [problem]
    file = str(path)
    if b"\0" in data:
        line, col = _position(data, data.index(b"\0"))
        return None, [Diagnostic(file, line, col, "not a recipe file (binary): it holds a NUL "
                                 "byte", hint="a recipe is UTF-8 text")]
    try:
        return data.decode("utf-8"), []
    except UnicodeDecodeError as e:
        line, col = _position(data, e.start)
        return None, [Diagnostic(
            file, line, col, f"not a recipe file (binary): invalid UTF-8 byte "
            f"0x{data[e.start]:02x} (byte offset {e.start})",
            hint="a recipe is UTF-8 text; save the file as UTF-8")]


def read_recipe_bytes(path: str | os.PathLike) -> tuple[bytes | None, Diagnostic | None]:
    """The bytes of a regular file of at most ``MAX_FILE_BYTES`` (symlinks followed),
    else None and a one-line diagnostic. ``stat`` decides before anything is opened:
    opening a FIFO would block, opening a device can act on it."""
    file = str(path)

    def refuse(message: str, hint: str | None = None) -> tuple[None, Diagnostic]:
        return None, Diagnostic(file, 1, 1, message, hint=hint)

    try:
        st = os.stat(path)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        return refuse(f"cannot read recipe: {getattr(e, 'strerror', None) or e}")
    if not stat.S_ISREG(st.st_mode):
        return refuse(f"not a recipe file ({file_kind(st.st_mode)})",
                      "a recipe is a regular .qrec file")
    if st.st_size > MAX_FILE_BYTES:
        return refuse(f"recipe file is larger than {MAX_FILE_BYTES} bytes ({st.st_size})")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        return refuse(f"cannot read recipe: {e.strerror or e}")
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return refuse("recipe file was replaced while being opened; not read")
        chunks, size = [], 0
        while size <= MAX_FILE_BYTES:  # st_size is 0 for /proc files: read to the cap
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        return refuse(f"cannot read recipe: {e.strerror or e}")
    finally:
        os.close(fd)
    if size > MAX_FILE_BYTES:
        return refuse(f"recipe file is larger than {MAX_FILE_BYTES} bytes")
    return b"".join(chunks), None


def file_kind(mode: int) -> str:
    """What a non-regular file is, for a message."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _position(data: bytes, offset: int) -> tuple[int, int]:
    """1-based (line, column) of a byte offset; the column counts the line's valid
    UTF-8 characters before it."""
    start = data.rfind(b"\n", 0, offset) + 1
    return data.count(b"\n", 0, offset) + 1, \
        len(data[start:offset].decode("utf-8", errors="replace")) + 1


def _export_diags(out: _Result, file: str, text: str) -> list[Diagnostic]:
    """``set export = F``: every rule F cannot carry (qdsl.lang.exportrules)."""
    fmt = next((s.value for s in reversed(out.settings) if s.field == "export"), None)
    if fmt is None:
        return []
    lines = {file: text.splitlines()}

    def source(f: str, line: int) -> str:
        if f not in lines:
            try:
                lines[f] = Path(f).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError):
                lines[f] = []
        return lines[f][line - 1] if 0 < line <= len(lines[f]) else ""
    return rule_diagnostics(out.rules, fmt, source)


def _finish(out: _Result, file: str, text: str) -> Recipe:
    out.diags += _export_diags(out, file, text)
    errors = [d for d in out.diags if d.severity == "error"]
    if errors:
        raise RecipeError(errors)
    settings = Settings()
    for s in out.settings:
        settings = settings.then(Settings(**{s.field: s.value}))
    return Recipe(tuple(out.rules), settings, source=file, text=text,
                  transforms=tuple(out.transforms))


def _compile(text: str, file: str, base: Path, stack: tuple[Path, ...], out: _Result) -> None:
    doc, diags = parse_document(text, file)
    items, check_diags, _ = check_document(doc)
    own, mark = [*diags, *check_diags], len(out.diags)
    for item in items:
        if isinstance(item, Rule):
            out.rules.append(item)
        elif isinstance(item, Transform):
            out.transforms.append(item)
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

    if not node.path.endswith(RECIPE_SUFFIX):
        err(f"not a recipe file: `{node.path}`", f"only {RECIPE_SUFFIX} files can be included")
        return
    try:
        target = resolve_include(node.path, base)
    except (OSError, ValueError) as e:
        err(f"cannot include `{node.path}`: {getattr(e, 'strerror', None) or e}")
        return
    if target is None:
        err(f"included file not found: `{node.path}`",
            f"looked in {base} and in the shipped recipes ({_recipes_dir()})")
        return
    key = target.resolve()
    if key.suffix != RECIPE_SUFFIX:  # a symlink named x.qrec to /etc/passwd
        err(f"not a recipe file: `{node.path}` is a link to a file not named *{RECIPE_SUFFIX}",
            f"only {RECIPE_SUFFIX} files can be included")
        return
    if key in stack:
        chain = " -> ".join(p.name for p in (*stack[stack.index(key):], key))
        err("file includes itself" if stack[-1] == key else f"include cycle: {chain}",
            "remove one of the includes")
        return
    if len(stack) >= MAX_INCLUDE_DEPTH:
        err(f"includes nested more than {MAX_INCLUDE_DEPTH} deep", "flatten the include chain")
        return
    if out.files >= MAX_INCLUDED_FILES:
        err(f"more than {MAX_INCLUDED_FILES} files included in one recipe",
            "include each file once")
        return
    out.files += 1
    text, diags = read_text(target)
    if text is None:  # one line at the include, naming the file and why (never its content)
        (d,) = diags
        where = f" (line {d.line}, column {d.col})" if (d.line, d.col) != (1, 1) else ""
        err(f"cannot include `{node.path}`: {d.message}{where}", d.hint)
        return
    _compile(text, str(target), target.parent, (*stack, key), out)


def resolve_include(path: str, base: Path) -> Path | None:
    """The file an include names: relative to ``base``, then the shipped recipes dir.

    The first candidate that exists is the one (``stat``, following links; it is
    not opened here); None if none exists. Other stat failures (permission,
    a loop of links, a name too long) raise ``OSError``.
    """
    candidates = [Path(path)] if Path(path).is_absolute() else [base / path]
    recipes = _recipes_dir()
    if recipes is not None and not Path(path).is_absolute():
        candidates.append(recipes / path)
    for c in candidates:
        try:
            os.stat(c)
        except FileNotFoundError:
            continue
        except OSError as e:
            if e.errno == errno.ENOTDIR:
                continue
            raise
        return c
    return None


def _recipes_dir() -> Path | None:
    try:
        return data_dir("recipes")
    except FileNotFoundError:
        return None
