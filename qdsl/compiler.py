"""The library functions behind ``qdsl explain`` and ``qdsl compile``.

    recipe text --lang--> Recipe
    model --capture--> fx graph --name--> NamedGraph --match(Recipe)--> QuantPlan
    (compile) --insert_observers--> --calibrate--> --freeze--> --lower--> quantized graph
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .plan import QuantPlan, build_plan
from .recipe import Recipe

ModelArg = Any  # a short name / directory / hub id, or an nn.Module


def as_recipe(recipe: Recipe | str | os.PathLike) -> Recipe:
    """A Recipe, or a path to a .qrec file, or recipe text (if it contains '->')."""
    from .lang import load_recipe, parse_recipe

    if isinstance(recipe, Recipe):
        return recipe
    text = str(recipe)
    if "->" in text or "\n" in text:
        return parse_recipe(text)
    return load_recipe(text)


def as_model(model: ModelArg):
    """(nn.Module, tokenizer or None, model id) from a model argument."""
    if isinstance(model, torch.nn.Module):
        return model.eval(), None, type(model).__name__
    from .models import load_model

    m, tok = load_model(str(model))
    return m, tok, str(model)


@dataclass
class Explanation:
    recipe: Recipe
    captured: Any  # qdsl.capture.Captured
    named: Any     # qdsl.naming.NamedGraph
    plan: QuantPlan
    lower: str

    def _execution(self):
        if self.lower != "int8":
            return None
        from .passes.lower_int8 import execution_of

        return lambda entry: execution_of(entry, self.plan, self.named)

    def rows(self) -> list[dict[str, Any]]:
        from .explain import rows

        return rows(self.plan, self.named, self._execution())

    def table(self) -> str:
        from .explain import render_table

        return render_table(self.rows())

    def summary(self) -> str:
        from .explain import render_summary

        return render_summary(self.plan, self.captured.gm, self.named)

    def draw(self, path: str, block: int = 0) -> None:
        from .explain import draw_block

        draw_block(self.captured.gm, self.named, self.plan, path, block=block)


def explain(recipe: Recipe | str, model: ModelArg, *, lower: str | None = None,
            example_inputs: tuple | None = None) -> Explanation:
    """Capture ``model`` (plain graph), name it, and match ``recipe``: no data needed."""
    from .capture import capture
    from .naming import name_graph

    r = as_recipe(recipe)
    m, _, _ = as_model(model)
    captured = capture(m, example_inputs, mode="plain")
    named = name_graph(captured)
    plan = build_plan(r, named)
    return Explanation(r, captured, named, plan, lower or r.settings.lower or "fake")
