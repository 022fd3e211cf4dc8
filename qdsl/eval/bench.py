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
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import QdslError

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
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _context(lines: list[str], i: int, max_chars: int) -> str:
    """Lines [0, i) joined with their line breaks, left-cut at a line start."""
    out, size = [], 0
    for line in reversed(lines[:i]):
        size += len(line) + 1
        if size > max_chars and out:
            break
        out.append(line)
    return "\n".join(reversed(out)) + "\n"


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
        cand = [i for i in range(1, len(lines)) if not is_trivial(lines[i])
                and any(lines[j].strip() for j in range(i))]
        if cand:
            pools.append((f, lines, cand))
    samples: list[Sample] = []
    while len(samples) < n and pools:
        for f, lines, cand in list(pools):
            if len(samples) >= n:
                break
            i = cand.pop(rng.randrange(len(cand)))
            if not cand:
                pools.remove((f, lines, cand))
            rel = f.relative_to(root).as_posix()
            samples.append(Sample(f"{rel}:{i + 1}", rel, i + 1,
                                  _context(lines, i, max_chars), lines[i]))
    return samples


def python_files(directory: Path) -> list[Path]:
    skip = {"__pycache__", ".git", ".venv", "node_modules", "site-packages"}
    root = Path(directory)
    return [p for p in root.rglob("*.py")
            if p.is_file() and not skip.intersection(p.relative_to(root).parts[:-1])]


def bench_from_dir(directory: str | os.PathLike, n: int, seed: int = 0,
                   max_chars: int = DEFAULT_MAX_CHARS) -> list[Sample]:
    root = Path(directory)
    if not root.is_dir():
        raise BenchError(f"{root}: not a directory")
    return build_bench(python_files(root), root, n, seed, max_chars)


def stdlib_bench(n: int, seed: int = 0, max_chars: int = DEFAULT_MAX_CHARS) -> list[Sample]:
    """The standard bench: the held-out test split of the local Python's stdlib
    (the files ``stdlib-gpt2`` never saw)."""
    from .stdlib import stdlib_dir, stdlib_files
    return build_bench(stdlib_files("test"), stdlib_dir(), n, seed, max_chars)


def save_jsonl(samples: list[Sample], path: str | os.PathLike) -> None:
    """Write samples atomically, one JSON object per line."""
    write_text_atomic(path, "".join(json.dumps(asdict(s), ensure_ascii=False) + "\n"
                                    for s in samples))


def load_jsonl(path: str | os.PathLike) -> list[Sample]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for k, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                s = Sample(str(d["id"]), str(d["path"]), int(d["line"]),
                           str(d["context"]), str(d["target"]))
            except (ValueError, KeyError, TypeError) as e:
                raise BenchError(f"{path}:{k}: not a benchmark sample ({e})") from e
            if not s.context.endswith("\n") or "\n" in s.target:
                raise BenchError(f"{path}:{k}: context must end with a line break "
                                 f"and target be one line")
            out.append(s)
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
