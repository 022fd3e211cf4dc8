"""Pass: put an observer on the output of every node whose activation the plan
quantizes statically.

requires: ``gm`` is the graph ``named`` was computed on; ``plan`` matches ``named``.
ensures:  for each such node N, every user of N reads ``qdsl_act__N(N)``, an
          observer that records ranges and returns its input unchanged (so the
          graph still computes the float model). Dynamic and float activations
          get nothing here (their modules come at lowering). Returns the observers.
"""

from __future__ import annotations

from torch import fx

from ..quant.observers import Observer, make_observer
from ..plan import QuantPlan
from .common import set_activation_module


def needs_observer(spec) -> bool:
    return spec.quantized and not spec.dynamic


def insert_observers(gm: fx.GraphModule, named, plan: QuantPlan) -> dict[str, Observer]:
    observers: dict[str, Observer] = {}
    for node in named.nodes:
        spec = plan[node.name].activation
        if needs_observer(spec):
            observers[node.name] = make_observer(spec)
            set_activation_module(gm, node.name, node.node, observers[node.name])
    gm.recompile()
    return observers
