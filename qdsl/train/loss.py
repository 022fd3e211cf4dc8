"""XTC's distillation loss (Wu et al. 2022, after TinyBERT), with a teacher-layer map.

    loss = w_logits * soft cross-entropy(student logits, teacher probabilities)
                      (taken less the teacher's entropy, i.e. KL(teacher || student): the
                      same gradient, and a loss that reaches 0 when the student matches)
         + w_hidden * sum over matched hidden states of MSE(student, teacher)
         + w_attn   * sum over matched blocks of MSE(student attention, teacher attention)

Hidden states: the embeddings (input of block 0) and the output of every student
block, matched to the output of the teacher block it was initialised from
(``config.student.student_map``); a full-depth student matches block i to block i.
Attention: transformers' eager attention maps (``output_attentions``: the
probabilities after softmax, [B, heads, T, T]) of the same pairs; XTC matches the
pre-softmax scores, which transformers does not return. The seed's weights are all 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.student import find_blocks


@dataclass(frozen=True)
class LossWeights:
    logits: float = 1.0
    hidden: float = 1.0
    attn: float = 1.0


@dataclass
class Outputs:
    logits: Tensor
    hidden: list[Tensor]      # [embeddings, block 0 output, block 1 output, ...]
    attn: list[Tensor]        # one [B, H, T, T] per block


def run_model(model: nn.Module, ids: Tensor) -> Outputs:
    """Logits, the embeddings and every block's output (forward hooks: transformers'
    ``hidden_states`` puts the final norm on the last one), and the attention maps."""
    _, blocks = find_blocks(model)
    hidden: list[Tensor] = []

    def grab(_m, args, kwargs, out):
        if not hidden:  # the first block's input: the embeddings
            hidden.append(args[0] if args else kwargs["hidden_states"])
        hidden.append(out[0] if isinstance(out, tuple) else out)

    hooks = [b.register_forward_hook(grab, with_kwargs=True) for b in blocks]
    try:
        out = model(input_ids=ids, output_attentions=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return Outputs(out.logits, hidden, list(out.attentions))


def soft_cross_entropy(student: Tensor, teacher: Tensor) -> Tensor:
    """sum p_t (log p_t - log p_s), mean over positions: XTC's soft cross-entropy
    -sum p_t log p_s less the teacher's entropy (a constant)."""
    log_t = F.log_softmax(teacher.float(), -1)
    return (log_t.exp() * (log_t - F.log_softmax(student.float(), -1))).sum(-1).mean()


def distill_loss(s: Outputs, t: Outputs, layer_map: tuple[int, ...],
                 w: LossWeights = LossWeights()) -> tuple[Tensor, dict[str, float]]:
    """(total loss, its parts as floats). ``layer_map[i]``: the teacher block of student
    block i."""
    if len(layer_map) != len(s.attn):
        raise ValueError(f"layer map of {len(layer_map)} blocks for a student of {len(s.attn)}")
    logits = soft_cross_entropy(s.logits, t.logits)
    hidden = F.mse_loss(s.hidden[0], t.hidden[0])
    attn = s.logits.new_zeros(())
    for i, ti in enumerate(layer_map):
        hidden = hidden + F.mse_loss(s.hidden[i + 1], t.hidden[ti + 1])
        attn = attn + F.mse_loss(s.attn[i], t.attn[ti])
    total = w.logits * logits + w.hidden * hidden + w.attn * attn
    return total, {"logits": float(logits.detach()), "hidden": float(hidden.detach()),
                   "attn": float(attn.detach())}
