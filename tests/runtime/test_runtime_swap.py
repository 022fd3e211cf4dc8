"""swap_linears on tiny models: logits close to float, top-1 agreement, and the
lowered files reload (meta device + assign) to the same outputs."""

import copy

import pytest
import torch
from tiny import tiny

from qdsl.runtime import (Int8DynamicLinear, Int8Embedding, PackedLinear, load_lowered,
                          save_lowered, swap_linears)

# scheme -> (max relative logit error, min top-1 agreement) on a random tiny model
# (random tiny models have near-tied logits, so top-1 can flip at 1% logit error)
BOUNDS = {"w8a8-dynamic": (0.05, 0.85), "w8-weight-only": (0.05, 0.85), "w4": (0.4, 0.6)}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("scheme", list(BOUNDS))
def test_swap_close_and_reloads(family, scheme, tmp_path):
    model = tiny(family)
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        q = swap_linears(copy.deepcopy(model), scheme)
        y = q(ids).logits
    err, top1 = float((y - ref).norm() / ref.norm()), float((y.argmax(-1) == ref.argmax(-1)).float().mean())
    max_err, min_top1 = BOUNDS[scheme]
    assert err < max_err and top1 >= min_top1, (err, top1)
    assert not any(isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
                   for m in q.modules())
    save_lowered(q, scheme, tmp_path)
    with torch.no_grad():
        assert torch.equal(load_lowered(tmp_path, attn=q.config._attn_implementation)(ids).logits, y)


def test_tied_head_shares_the_embedding_codes(tmp_path):
    q = swap_linears(tiny("gpt2"), "w8a8-dynamic")
    assert isinstance(q.transformer.wte, Int8Embedding)
    assert isinstance(q.lm_head, Int8DynamicLinear)
    assert q.lm_head.weight is q.transformer.wte.weight
    save_lowered(q, "w8a8-dynamic", tmp_path)
    r = load_lowered(tmp_path)
    assert r.lm_head.weight is r.transformer.wte.weight
    assert isinstance(swap_linears(tiny("llama"), "w4").model.layers[0].mlp.up_proj, PackedLinear)
