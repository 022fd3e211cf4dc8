"""The tensors a compiled decode step reads, moved into one buffer on transparent huge
pages (issue 15, "decode at the bandwidth limit").

A decode step streams every weight and every layer's key/value cache from memory once.
Each of those tensors is its own allocation on 4 KiB pages, most under torch's own
huge-page threshold (``THP_MEM_ALLOC_ENABLE``: 2 MiB and up, and only when set before
torch starts): the hardware prefetchers stop at every page boundary and every page costs
a TLB miss, so short streams read at about half the bandwidth of one long one (1 thread,
AMD EPYC: 30 layers' key/value slices of a 560-token SmolLM2 cache 13.4 GB/s, the same
bytes on huge pages 19.0 GB/s, one 256 MB tensor 25 GB/s). ``rehome`` copies a module's
parameters, buffers and tensor attributes, in the order its graph uses them, into one
allocation advised ``MADV_HUGEPAGE`` (before its pages are first touched), and points
each tensor at its copy: same values, shapes, strides and dtypes, the caches still
updated in place. Tensors sharing a storage (tied weights, views) keep sharing it.

Linux with transparent huge pages in ``always`` or ``madvise`` mode; elsewhere (or with
``$QDSL_HUGE_PAGES=0``) nothing moves. The copy costs the model's size in memory while it
runs (the old storages are freed where nothing else holds them) and ~0.1 s per 100 MB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

ENV = "QDSL_HUGE_PAGES"        # 0: leave every tensor where it is
HUGE = 2 << 20                 # x86-64's transparent huge page
ALIGN = 64                     # each storage starts on a cache line
MADV_HUGEPAGE = 14             # <sys/mman.h>, Linux
MIN_BYTES = HUGE               # fewer bytes than this in all: not worth a buffer


def wanted() -> bool:
    return os.environ.get(ENV, "").strip().lower() not in ("0", "false", "no", "off")


def _madvise():
    """libc's ``madvise``, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def huge_buffer(nbytes: int) -> torch.Tensor | None:
    """``nbytes`` of uint8, starting on a huge-page boundary and advised ``MADV_HUGEPAGE``
    before anything touches it; None where the advice is refused (or not Linux)."""
    madvise = _madvise()
    if madvise is None or nbytes <= 0:
        return None
    length = (nbytes + HUGE - 1) // HUGE * HUGE        # whole huge pages
    raw = torch.empty(length + HUGE, dtype=torch.uint8)
    off = (-raw.data_ptr()) % HUGE
    if madvise(raw.data_ptr() + off, length, MADV_HUGEPAGE) != 0:
        return None
    return raw[off:off + nbytes]


_HOLDER = "_qdsl_huge_pages"


class _Buffer:
    """Holds the buffer the moved tensors' storages point into (they do not own it)."""

    def __init__(self, buf: torch.Tensor) -> None:
        self.buf = buf


@dataclass
class Moved:
    tensors: int = 0           # tensors pointed at the buffer
    storages: int = 0          # distinct storages copied
    nbytes: int = 0            # their bytes


def _slots(module: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """Every (owner, name, tensor) of ``module``'s tree: parameters, buffers and plain
    tensor attributes, each slot once, in the order a graph uses its modules (the
    GraphModule's nodes first, then the rest in registration order)."""
    order: list[nn.Module] = []
    seen: set[int] = set()

    def visit(m: nn.Module) -> None:
        for sub in m.modules():
            if id(sub) not in seen:
                seen.add(id(sub))
                order.append(sub)

    if isinstance(module, torch.fx.GraphModule):
        for node in module.graph.nodes:
            if node.op in ("call_module", "get_attr"):
                owner, _, _ = str(node.target).rpartition(".")
                try:
                    visit(module.get_submodule(node.target) if node.op == "call_module"
                          else module.get_submodule(owner))
                except AttributeError:
                    continue
    visit(module)
    return [(m, name, t) for m in order
            for name, t in (*m._parameters.items(), *m._buffers.items(), *vars(m).items())
            if isinstance(t, torch.Tensor) and t.device.type == "cpu"
            and t.layout == torch.strided]


def rehome(module: nn.Module, min_bytes: int | None = None) -> Moved:
    """Copy ``module``'s tensors into one huge-page buffer and point them at it (see the
    module docstring). Nothing moves where the tensors come to under ``min_bytes``
    (default ``MIN_BYTES``), where the buffer cannot be advised, or where the module was
    moved already; tensors off the CPU stay where they are. -> what moved."""
    if _HOLDER in module.__dict__:       # moved already
        return Moved()
    slots = _slots(module)
    ptrs = [t.untyped_storage().data_ptr() for _, _, t in slots]
    storages = {s.data_ptr(): s for s in (t.untyped_storage() for _, _, t in slots)
                if s.nbytes()}
    place, total = {}, 0
    for ptr, s in storages.items():
        place[ptr] = total
        total += (s.nbytes() + ALIGN - 1) // ALIGN * ALIGN
    if total < (MIN_BYTES if min_bytes is None else min_bytes):
        return Moved()
    buf = huge_buffer(total)
    if buf is None:
        return Moved()
    # one storage per original storage, over its own range of the buffer: tensors that
    # shared one still share it, and no two inputs of a compiled graph alias (AOTAutograd
    # would route every mutated cache through a slow "synthetic base")
    addr = buf.data_ptr()
    fresh = {ptr: torch.frombuffer((ctypes.c_char * s.nbytes()).from_address(addr + place[ptr]),
                                   dtype=torch.uint8)
             for ptr, s in storages.items()}
    for ptr, s in storages.items():
        fresh[ptr].copy_(torch.empty(0, dtype=torch.uint8).set_(s))
    moved = Moved(storages=len(storages), nbytes=total)
    for (owner, name, t), ptr in zip(slots, ptrs):   # (a tied tensor seen again: no-op)
        if ptr not in fresh:
            continue
        new = torch.empty(0, dtype=t.dtype).set_(fresh[ptr].untyped_storage(),
                                                 t.storage_offset(), t.size(), t.stride())
        if name in owner._parameters:
            owner._parameters[name].data = new
        elif name in owner._buffers:
            owner._buffers[name] = new
        else:
            setattr(owner, name, new)
        moved.tensors += 1
    module.__dict__[_HOLDER] = _Buffer(buf)   # the memory lives as long as the module
    return moved
