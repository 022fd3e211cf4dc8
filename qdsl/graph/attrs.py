"""Reading a graph module's attributes: the tensor behind a ``get_attr`` target."""

from __future__ import annotations

from typing import Any

import torch


def param(gm: torch.nn.Module, target: str) -> torch.Tensor:
    """The tensor behind a get_attr target (parameter, buffer or constant)."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    assert isinstance(obj, torch.Tensor), f"{target} is {type(obj).__name__}, not a tensor"
    return obj
