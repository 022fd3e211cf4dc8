"""A layer-reduced student (``set student.blocks``, ``config/student.py``): a copy
of a model that keeps some of its transformer blocks, in order.

    student = make_student(teacher, (1, 3))   # blocks 1 and 3 of a 4-block GPT-2

The copy shares nothing with the teacher (deep copy), its config states the new block
count, and each kept attention's ``layer_idx`` (the key/value cache slot) is renumbered
0 .. k-1, so capture and generation see an ordinary k-block model.
"""

from __future__ import annotations

import copy

import torch

from ..errors import ModelError
from .limits import BLOCK_KEYS, blocks_of_config


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(module path, ModuleList) of the model's transformer blocks: the ModuleList whose
    length is the config's block count (``transformer.h``, ``model.layers``)."""
    n = blocks_of_config(getattr(model, "config", None) or {})
    found = [(name, m) for name, m in model.named_modules()
             if type(m) is torch.nn.ModuleList and len(m) == n]  # not parametrization lists
    if n is None or len(found) != 1:
        raise ModelError(f"cannot find the transformer blocks of {type(model).__name__} "
                         f"(config blocks: {n}, matching ModuleLists: "
                         f"{[name for name, _ in found]})")
    return found[0]


def make_student(teacher: torch.nn.Module, blocks: tuple[int, ...]) -> torch.nn.Module:
    """A deep copy of ``teacher`` keeping ``blocks`` (teacher indices, increasing)."""
    path, _ = find_blocks(teacher)
    student = copy.deepcopy(teacher)
    parent_path, _, attr = path.rpartition(".")
    parent = student.get_submodule(parent_path) if parent_path else student
    old = getattr(parent, attr)
    kept = torch.nn.ModuleList([old[b] for b in blocks])
    setattr(parent, attr, kept)
    for i, block in enumerate(kept):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = i
    cfg = student.config
    for key in BLOCK_KEYS:
        if isinstance(getattr(cfg, key, None), int):
            setattr(cfg, key, len(blocks))
    for key in ("layer_types",):  # per-layer lists (some families) follow the blocks
        v = getattr(cfg, key, None)
        if isinstance(v, list) and len(v) == len(old):
            setattr(cfg, key, [v[b] for b in blocks])
    return student
