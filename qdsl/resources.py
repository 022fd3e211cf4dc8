"""Locate the data directories shipped with qdsl (grammar/, recipes/).

In a wheel they sit inside the package (``qdsl/grammar``); in a source
checkout or editable install they sit at the repository root.
"""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """Return the directory ``name`` ('grammar' or 'recipes')."""
    for candidate in (_PKG / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"qdsl data directory {name!r} not found next to {_PKG}")
