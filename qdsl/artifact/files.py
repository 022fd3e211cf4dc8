"""An artifact's files as read from disk: every file qdsl reads is a regular file (no
symlink, device, FIFO), is present, and (verify) has the size and sha256 recorded at
save; JSON files are size-bounded before they are parsed.

The hashes detect damage (a flipped byte, a truncated copy), not tampering: whoever
can edit a file can edit the marker's hash of it too. The schema checks, the
cross-checks and the size checks still apply to such an artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import ArtifactError


CHUNK = 1 << 20                 # sha256 is computed over 1 MiB reads
MAX_JSON_BYTES = 256 << 20      # plan.json of a 1000-layer model is a few MB


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_records(d: Path, skip: str) -> dict[str, dict[str, Any]]:
    """{relative posix path: {"sha256", "size"}} of every file under ``d`` but ``skip``."""
    out = {}
    for f in sorted(d.rglob("*")):
        rel = f.relative_to(d).as_posix()
        if f.is_file() and rel != skip:
            out[rel] = {"sha256": sha256_file(f), "size": f.stat().st_size}
    return out




def regular_file(d: Path, rel: str) -> os.stat_result:
    """``d/rel``'s stat if it is a regular file (not a link, device, FIFO, directory):
    decided from lstat, before anything opens it; else an ArtifactError naming it."""
    p = d / rel
    parent = p.parent
    while parent != d:                      # model/ itself must not be a link either
        try:
            if not stat.S_ISDIR(os.lstat(parent).st_mode):
                raise ArtifactError(f"artifact {d}: {parent.relative_to(d)} is not a directory")
        except FileNotFoundError:
            raise ArtifactError(f"artifact {d}: {rel} is missing") from None
        parent = parent.parent
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        raise ArtifactError(f"artifact {d}: {rel} is missing") from None
    if stat.S_ISLNK(st.st_mode):
        raise ArtifactError(f"artifact {d}: {rel} is a symbolic link; artifact files must "
                            "be regular files (copy the file in)")
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"artifact {d}: {rel} is not a regular file")
    return st


def verify_files(d: Path, recorded: dict[str, dict], reads: list[str]) -> None:
    """Every recorded file has its recorded size and sha256; every file qdsl reads
    (``reads``, and anything under model/) is recorded."""
    for rel in reads:
        if rel not in recorded:
            raise ArtifactError(f"artifact {d}: {rel} is not recorded in qdsl_artifact.json "
                                "(added after the artifact was written?)")
    for rel, rec in recorded.items():
        st = regular_file(d, rel)
        if st.st_size != rec["size"] or sha256_file(d / rel) != rec["sha256"]:
            raise ArtifactError(
                f"artifact {d}: {rel} does not match its recorded hash (the file was changed "
                "or damaged); recompile, or pass --no-verify to load it anyway")


def read_json(d: Path, rel: str) -> Any:
    """A JSON file of the artifact: regular, bounded, UTF-8, strict (no NaN / Infinity)."""
    st = regular_file(d, rel)
    if st.st_size > MAX_JSON_BYTES:
        raise ArtifactError(f"artifact {d}: {rel} is {st.st_size} bytes, more than any "
                            f"artifact writes ({MAX_JSON_BYTES})")

    def no_constants(name):
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads((d / rel).read_bytes().decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArtifactError(f"artifact {d}: {rel} is not valid JSON: "
                            f"{str(e)[:200] or type(e).__name__}") from None


def model_dir_files(d: Path) -> list[str]:
    """Files under model/ (each must be a regular file: a tokenizer reads them all)."""
    if not (d / "model").exists() and not (d / "model").is_symlink():
        return []
    regular_file(d, "model/config.json")
    out = []
    for root, dirs, files in os.walk(d / "model"):
        for name in dirs + files:
            rel = (Path(root) / name).relative_to(d).as_posix()
            if name in files:
                regular_file(d, rel)
                out.append(rel)
            elif os.path.islink(Path(root) / name):
                raise ArtifactError(f"artifact {d}: {rel} is a symbolic link")
    return sorted(out)
