"""Line-completion benchmarks built from any directory of Python files.

A sample is a file prefix ending at a line break (the context) and the line
that follows it (the target). Samples are model independent: the context is
stored as text (the last ``max_chars`` characters, cut at a line start) and each
model left-truncates its own tokens to its budget at evaluation time
(``qdsl.eval.complete``). A benchmark can be frozen to JSONL and shared.

Sampling, for a given seed: files are sorted by relative path and shuffled;
then round robin, each file contributes one random non-trivial target line per
round until ``n`` samples exist (so small and large files are spread evenly).
Trivial targets are skipped: blank lines and lines of only brackets and
punctuation (``)``, ``]),``, ``}:``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import QdslError
from ..models.stdlib import stdlib_dir, stdlib_files

log = logging.getLogger(__name__)

TRIVIAL = re.compile(r"^[\s()\[\]{},:;.\\]*$")
DEFAULT_MAX_CHARS = 8192
MAX_FILE_BYTES = 1 << 20   # skip generated giants


class BenchError(QdslError):
    """A benchmark directory or JSONL file cannot be used."""


@dataclass(frozen=True)
class Sample:
    id: str         # "relpath:line"
    path: str       # relative to the benchmark root
    line: int       # 1-based line number of the target
    context: str    # text before the target line; ends with "\n"
    target: str     # the target line, without its line break

    @property
    def indent(self) -> str:
        return self.target[:len(self.target) - len(self.target.lstrip())]


def is_trivial(line: str) -> bool:
    return TRIVIAL.match(line) is not None


def _read_lines(path: Path) -> list[str] | None:
    """The file's lines, or None (logged) if it is not a regular UTF-8 file of at most
    MAX_FILE_BYTES. Opened without blocking and checked after opening, so a FIFO or
    device swapped in for a listed file is never read from."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        log.info("%s: skipped (%s)", path, e.strerror or e)
        return None
    with os.fdopen(fd, "rb") as fh:
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                log.info("%s: skipped (not a regular file)", path)
                return None
            data = fh.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            log.info("%s: skipped (%s)", path, e.strerror or e)
            return None
    if len(data) > MAX_FILE_BYTES:
        log.info("%s: skipped (over %d bytes)", path, MAX_FILE_BYTES)
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        log.info("%s: skipped (not UTF-8)", path)
        return None
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _context(lines: list[str], i: int, max_chars: int) -> str:
    """Lines [0, i) joined with their line breaks, left-cut at a line start.

    Walks back from line i and stops at the budget: O(lines kept), not O(i)."""
    out, size = [], 0
    for j in range(i - 1, -1, -1):
        size += len(lines[j]) + 1
        if size > max_chars and out:
            break
        out.append(lines[j])
    return "\n".join(reversed(out)) + "\n"


def _candidates(lines: list[str]) -> list[int]:
    """Target lines: non-trivial, after the first non-blank line. Linear in the file
    (testing "some earlier line is not blank" per line was quadratic in leading blanks)."""
    first = next((j for j, line in enumerate(lines) if line.strip()), len(lines))
    return [i for i in range(first + 1, len(lines)) if not is_trivial(lines[i])]


def build_bench(files: list[Path], root: Path, n: int, seed: int = 0,
                max_chars: int = DEFAULT_MAX_CHARS) -> list[Sample]:
    """n samples from the given .py files (paths under ``root``), deterministic by seed."""
    if not files:
        raise BenchError(f"{root}: no .py files")
    rng = random.Random(seed)
    order = sorted(files, key=lambda p: p.relative_to(root).as_posix())
    rng.shuffle(order)
    pools: list[tuple[Path, list[str], list[int]]] = []
    for f in order:
        lines = _read_lines(f)
        if lines is None:
            continue
        cand = _candidates(lines)
        if cand:
            pools.append((f, lines, cand))
    if not pools and n > 0:
        raise BenchError(f"{root}: none of its {len(files)} .py files has a line to complete "
                         "(all empty, unreadable, not UTF-8 or over "
                         f"{MAX_FILE_BYTES >> 20} MB)")
    samples: list[Sample] = []
    while len(samples) < n and pools:
        for f, lines, cand in pools:   # one round: one target per file
            if len(samples) >= n:
                break
            i = cand.pop(rng.randrange(len(cand)))
            rel = f.relative_to(root).as_posix()
            samples.append(Sample(f"{rel}:{i + 1}", rel, i + 1,
                                  _context(lines, i, max_chars), lines[i]))
        pools = [p for p in pools if p[2]]   # drop exhausted files after the round
    return samples


SKIP_DIRS = frozenset({"__pycache__", ".git", ".venv", "node_modules", "site-packages"})


def python_files(directory: str | os.PathLike) -> list[Path]:
    """The regular ``.py`` files under ``directory``, as paths under it.

    Symlinked directories are never entered; a symlinked file is kept only if it
    resolves to a regular file inside the directory (one pointing outside is skipped
    with a warning naming it, so a benchmark never reads, or freezes with
    ``--save-bench``, a file from elsewhere). FIFOs, devices and sockets are skipped.
    """
    root = Path(directory)
    real_root = root.resolve()
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            if d in SKIP_DIRS:
                continue
            if (here / d).is_symlink():
                _warn_outside(here / d, real_root, "symlinked directory")
                continue
            keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            if not name.endswith(".py"):
                continue
            p = here / name
            try:
                if p.is_symlink():
                    if _warn_outside(p, real_root, "symlink"):
                        continue
                if not stat.S_ISREG(p.stat().st_mode):   # FIFO, device, socket, dangling
                    log.info("%s: skipped (not a regular file)", p)
                    continue
            except OSError as e:
                log.info("%s: skipped (%s)", p, e.strerror or e)
                continue
            out.append(p)
    return out


def _warn_outside(link: Path, real_root: Path, what: str) -> bool:
    """True (with a warning) if ``link`` resolves outside ``real_root``."""
    try:
        target = link.resolve()
    except (OSError, RuntimeError):   # a loop
        log.warning("%s: %s that cannot be resolved, skipped", link, what)
        return True
    if target != real_root and real_root not in target.parents:
        log.warning("%s: %s to %s, outside the benchmark directory, skipped",
                    link, what, target)
        return True
    return False


def bench_from_dir(directory: str | os.PathLike, n: int, seed: int = 0,
                   max_chars: int = DEFAULT_MAX_CHARS) -> list[Sample]:
    root = Path(directory)
    if not root.is_dir():
        raise BenchError(f"{root}: not a directory")
    return build_bench(python_files(root), root, n, seed, max_chars)


def stdlib_bench(n: int, seed: int = 0, max_chars: int = DEFAULT_MAX_CHARS) -> list[Sample]:
    """The standard bench: the held-out test split of the local Python's stdlib
    (the files ``stdlib-gpt2`` never saw)."""
    return build_bench(stdlib_files("test"), stdlib_dir(), n, seed, max_chars)


def save_jsonl(samples: list[Sample], path: str | os.PathLike) -> None:
    """Write samples atomically, one JSON object per line."""
    write_text_atomic(path, "".join(json.dumps(asdict(s), ensure_ascii=False) + "\n"
                                    for s in samples))


_FIELDS = {"id": str, "path": str, "line": int, "context": str, "target": str}


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number {text[:40]} is out of range")
    return x


def _sample(d, where: str) -> Sample:
    """A decoded JSONL line -> Sample, or a BenchError saying which field is wrong."""
    if not isinstance(d, dict):
        raise BenchError(f"{where}: expected a JSON object, got {type(d).__name__}")
    missing = [k for k in _FIELDS if k not in d]
    if missing:
        raise BenchError(f"{where}: missing key{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(missing)}")
    for k, t in _FIELDS.items():
        v = d[k]
        if not isinstance(v, t) or isinstance(v, bool):
            raise BenchError(f"{where}: {k!r} must be {'an integer' if t is int else 'a string'}, "
                             f"got {type(v).__name__}")
    if d["line"] < 1:
        raise BenchError(f"{where}: 'line' must be at least 1, got {d['line']}")
    if not d["context"].endswith("\n") or "\n" in d["target"]:
        raise BenchError(f"{where}: context must end with a line break and target be one line")
    return Sample(**{k: d[k] for k in _FIELDS})


def load_jsonl(path: str | os.PathLike) -> list[Sample]:
    """Samples from a JSONL file (one object per line with the Sample fields; other
    keys are ignored). Every problem is a BenchError naming ``FILE:LINE``: bytes that
    are not UTF-8, text that is not JSON (NaN, Infinity and numbers out of float range
    included, nesting too deep), a line that is not an object, a missing key or a
    value of the wrong type. A file with no samples is an error too."""
    out = []
    try:   # never blocks on a FIFO: opened non-blocking, refused unless a regular file
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise BenchError(f"{path}: cannot read: {e.strerror or e}") from e
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BenchError(f"{path}: not a regular file")
        for k, raw in enumerate(fh, 1):
            where = f"{path}:{k}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BenchError(f"{where}: not valid UTF-8 (byte {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                d = json.loads(line, parse_constant=_no_constant, parse_float=_finite_float)
            except RecursionError:
                raise BenchError(f"{where}: not valid JSON: nested too deeply") from None
            except ValueError as e:   # JSONDecodeError, or a number refused above
                raise BenchError(f"{where}: not valid JSON: {str(e)[:200]}") from None
            out.append(_sample(d, where))
    if not out:
        raise BenchError(f"{path}: no samples (an empty benchmark)")
    return out


def load_bench(spec: str, n: int | None = None, seed: int = 0) -> list[Sample]:
    """``stdlib``, a directory of .py files, or a .jsonl file -> samples.
    ``n`` (default 500) applies to built benches; a JSONL is cut to ``n`` if given."""
    if spec == "stdlib":
        return stdlib_bench(500 if n is None else n, seed)
    p = Path(spec)
    if p.is_dir():
        return bench_from_dir(p, 500 if n is None else n, seed)
    if p.is_file():
        samples = load_jsonl(p)
        return samples if n is None else samples[:n]
    raise BenchError(f"{spec}: not 'stdlib', a directory of .py files, or a .jsonl file")
