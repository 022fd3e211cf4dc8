"""Every runtime module by its JSON ``type``: one way back from ``to_json()``.

Each runtime module serialises the spec(s) it runs as ``TensorSpec.to_json()`` (the
one JSON shape of a spec): the fake-quant modules as ``{"type", "spec"}``, the int8 /
packed ones as ``{"type", shapes..., "weight", "act"?, "compute_dtype"?}``.
``module_from_json(config, state)`` rebuilds any of them: the fake-quant modules from
their config and frozen tensors, the int8 / packed ones on the meta device with
``state`` (when given) assigned (``load_state_dict(..., assign=True)``).

``GRAPH_TYPES`` adds the modules the passes put in a lowered graph besides quantizers
(``FusedAttention``, ``OnlineHadamard``, ``InputScale``): with them every module of a
lowered graph has a JSON form, which is how a stored graph names its modules
(``qdsl.compiler.graphfile``).
"""

from __future__ import annotations

from torch import Tensor, nn

from qdsl.runtime.attention import FusedAttention
from qdsl.runtime.fakequant import MODULE_TYPES as FAKE_TYPES
from qdsl.runtime.hadamard import OnlineHadamard
from qdsl.runtime.inputs import InputScale
from qdsl.runtime.int8 import (Int8DynamicLinear, Int8Embedding, Int8StaticLinear,
                               Int8WeightOnlyLinear)
from qdsl.runtime.binary import BinaryDynamicLinear
from qdsl.runtime.packed import PackedEmbedding, PackedLinear, W4DynamicLinear

INTEGER_TYPES: dict[str, type] = {c.__name__: c for c in (
    Int8DynamicLinear, Int8StaticLinear, Int8WeightOnlyLinear, Int8Embedding, PackedLinear,
    PackedEmbedding, BinaryDynamicLinear, W4DynamicLinear)}
RUNTIME_TYPES: dict[str, type] = {**FAKE_TYPES, **INTEGER_TYPES}
GRAPH_TYPES: dict[str, type] = {**RUNTIME_TYPES, **{c.__name__: c for c in (
    FusedAttention, OnlineHadamard, InputScale)}}


def module_from_json(config: dict, state: dict[str, Tensor] | None = None) -> nn.Module:
    """Rebuild a runtime module from its ``to_json()`` and ``state_dict()`` (KeyError /
    TypeError / ValueError when they are malformed)."""
    cls = GRAPH_TYPES[config["type"]]
    if cls.__name__ in FAKE_TYPES:
        return cls.from_state(config, state or {})
    m = cls.from_json(config)
    if state is not None:
        m.load_state_dict(state, assign=True)
    return m
