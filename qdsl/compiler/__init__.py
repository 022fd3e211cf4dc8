"""The compile driver: recipe + model -> plan -> passes -> artifact, and back.

``build`` (explain, compile, QuantizedModel), ``loading`` (load an artifact),
``source`` (does an artifact fit the model it is loaded against),
``lowered`` (rebuild an int8 graph from its stored tensors), ``render`` (a plan as a
table, a summary, a drawing). The public functions are re-exported here:
``qdsl.compiler.explain(recipe, model)``, ``qdsl.compiler.compile``, ``qdsl.compiler.load``.
"""

from .build import QuantizedModel, compile, explain
from .loading import load

__all__ = ["QuantizedModel", "compile", "explain", "load"]
