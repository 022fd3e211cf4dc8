"""Runtime modules: every module that runs in a lowered graph (buffers + a short forward).

* ``int8``, ``packed``, ``packing``: real int8 and packed low-bit weights; ``swap``
  puts them into an eager model.
* ``fakequant``: the simulation modules ``--lower fake`` inserts.
* ``attention``: ``FusedAttention`` (what ``passes.fuse_attention`` inserts).
* ``graphlm``: a captured graph run as a ``CausalLM`` (prefill + cached decode).
* ``registry``: every module by its JSON ``type`` (``module_from_json``). Each module is
  built from the ``TensorSpec``s it runs (``from_spec``) and records them as
  ``TensorSpec.to_json()``.
"""

from qdsl.runtime.int8 import (Int8DynamicLinear, Int8Embedding, Int8StaticLinear,
                               Int8WeightOnlyLinear)
from qdsl.runtime.packed import PackedEmbedding, PackedLinear
from qdsl.runtime.packing import pack_int, unpack_int
from qdsl.runtime.swap import SCHEMES, load_lowered, save_lowered, swap_linears

__all__ = ["Int8DynamicLinear", "Int8StaticLinear", "Int8WeightOnlyLinear", "Int8Embedding",
           "PackedLinear", "PackedEmbedding", "pack_int", "unpack_int", "SCHEMES",
           "swap_linears", "save_lowered", "load_lowered"]
