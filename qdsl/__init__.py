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

_LAZY = {"compile": "compiler", "load": "compiler", "QuantizedModel": "compiler",
         "load_recipe": "lang", "parse_recipe": "lang"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"qdsl.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'qdsl' has no attribute {name!r}")
