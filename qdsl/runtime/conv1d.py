"""transformers' ``Conv1D`` (GPT-2's linear layers): ``y = x W + b`` with the weight
stored ``[in, out]``, the transpose of ``nn.Linear``'s ``[out, in]``.

The one place that recognises a Conv1D and turns its weight around: ``swap_linears``
(runtime), ``freeze`` / ``lower_fake`` (a captured graph's ``addmm`` weight, layout
``"in_out"`` in ``qdsl.graph.roles.WEIGHTED_OPS``) and ``qdsl bench``'s torch.ao row
(``conv1d_to_linear``).
"""

from __future__ import annotations

from torch import Tensor, nn


def is_conv1d(m: nn.Module) -> bool:
    """Whether ``m`` is a transformers ``Conv1D`` (matched by class name and its ``nf``
    attribute, so transformers need not be imported)."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def linear_weight(m: nn.Module) -> Tensor | None:
    """The ``[out, in]`` weight of an ``nn.Linear`` or a Conv1D (a transposed view, no
    copy), else None."""
    if isinstance(m, nn.Linear):
        return m.weight
    if is_conv1d(m):
        return m.weight.t()
    return None


def oriented(w: Tensor, layout: str | None) -> Tensor:
    """A graph weight as ``[out, in]``: ``w.t()`` for layout ``"in_out"`` (a Conv1D's
    ``addmm``), else ``w``. Its own inverse: apply it again to store a result back."""
    return w.t() if layout == "in_out" else w


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace every Conv1D in ``model`` by the equivalent ``nn.Linear`` (weight copied
    as ``[out, in]``, the bias shared), in place; returns ``model``."""
    for name, m in list(model.named_modules()):
        if is_conv1d(m):
            lin = nn.Linear(m.weight.shape[0], m.nf)
            lin.weight, lin.bias = nn.Parameter(m.weight.t().contiguous()), m.bias
            model.set_submodule(name, lin)
    return model
