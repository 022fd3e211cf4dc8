"""qdsl: a declarative quantization-recipe language and graph compiler for PyTorch models.

    import qdsl
    qm = qdsl.compile(model, "recipes/storti/t3_res_sum.qrec", calib="my_code/")
    qm.save("out/")            # safetensors + JSON
    qm = qdsl.load("out/")     # no calibration; refuses a different source model
    qdsl.compiler.explain("recipes/card.qrec", model).table()   # no data needed

Attributes are imported lazily so that the language front end never imports torch.
"""

import importlib

__version__ = "0.1.0"

# What a compiled model computes, down to float summation order, changes with the code
# now and then, and greedy decoding can turn a last-bit difference into another
# completion (on Qwen2.5-Coder's dynamic W8A8, revision 1 -> 2 changed 70 of 164
# HumanEval programs, passing 57 vs 58). NUMERICS counts those revisions of what a
# loaded artifact computes (pass order, kernels); a compile that changes shows in the
# artifact's parameter hash instead. A sweep job's saved completions resume only under
# the same revision, and every sweep entry records the revision it ran under.
#   1  until 2026-12-06
#   2  the fake pipeline fuses float attention (f977c66); a greedy prefill computes the
#      head at the last position only (c5dc895)
NUMERICS = 2

_LAZY = {"compile": "compiler", "load": "compiler", "QuantizedModel": "compiler",
         "load_recipe": "lang", "parse_recipe": "lang"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"qdsl.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'qdsl' has no attribute {name!r}")
