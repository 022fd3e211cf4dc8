"""What every config module shares: the two tensor kinds and ``SpecError``."""

from __future__ import annotations

from typing import Literal

WEIGHT = "weight"
ACTIVATION = "activation"
Kind = Literal["weight", "activation"]


class SpecError(ValueError):
    """A spec value is out of its domain (raised on construction)."""
