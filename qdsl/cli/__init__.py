"""The ``qdsl`` command line (``qdsl = "qdsl.cli:main"``; ``python -m qdsl.cli``)."""

from .app import main

__all__ = ["main"]
