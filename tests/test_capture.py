"""Capture: exact logits at unseen lengths, KV-cache decoding, readable failures."""

from __future__ import annotations

import pytest
import torch

from qdsl.graph.capture import capture
from qdsl.errors import CaptureError
from tests.tiny import CAUSAL, FAMILIES, tiny, tiny_captured, tiny_ids

captured = tiny_captured


def _eager(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", list(FAMILIES))
def test_plain_graph_reproduces_eager_at_other_lengths(family):
    model, cap = captured(family)
    assert cap.mode == "plain" and cap.source is model and cap.prefix == "m."
    for batch, seq in [(3, 13), (1, 5), (2, 1)]:
        ids = tiny_ids(model, batch, seq)
        with torch.no_grad():
            torch.testing.assert_close(cap.gm(ids), _eager(model, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", CAUSAL)
def test_generate_graph_prefills_then_decodes_with_its_cache(family):
    model, cap = captured(family, "generate")
    assert cap.prefix == "model."
    ids = tiny_ids(model, 1, 12)
    with torch.no_grad():
        ref = model(input_ids=ids).logits                                    # [1, 12, V]
        pre = cap.gm(input_ids=ids[:, :10], cache_position=torch.arange(10))
        step = cap.gm(input_ids=ids[:, 10:11], cache_position=torch.arange(10, 11))
        step2 = cap.gm(input_ids=ids[:, 11:12], cache_position=torch.arange(11, 12))
    torch.testing.assert_close(pre, ref[:, :10], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step, ref[:, 10:11], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step2, ref[:, 11:12], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,mode", [("gpt2", "plain"), ("llama", "generate")])
def test_module_paths_lose_the_wrapper_prefix(family, mode):
    model, cap = captured(family, mode)
    real = {name for name, _ in model.named_modules()}
    paths = {cap.module_path(v[0]) for n in cap.gm.graph.nodes
             for v in (n.meta.get("nn_module_stack") or {}).values() if v[0] != "" and
             not str(v[0]).startswith("_empty")}
    assert paths and paths <= real | {""}


def test_sdpa_model_is_switched_to_eager_attention():
    model = tiny("gpt2")
    model.config._attn_implementation = "sdpa"
    cap = capture(model)
    ops = {str(n.target) for n in cap.gm.graph.nodes}
    assert "aten.softmax.int" in ops and not any("scaled_dot" in op for op in ops)


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x):  # x: [B, 8] -> [B, 4]
        return self.fc2(torch.relu(self.fc1(x)))


def test_plain_module_with_example_inputs_and_dynamic_shapes():
    toy = _Toy()
    cap = capture(toy, (torch.randn(3, 8),),
                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    x = torch.randn(7, 8)
    torch.testing.assert_close(cap.gm(x), toy(x))
    assert cap.prefix == "" and cap.module_path("fc1") == "fc1"


class _Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return self.fc(x)
        return -x


class _Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pre, self.gate = torch.nn.Linear(4, 4), _Branchy()

    def forward(self, x):
        return self.gate(self.pre(x))


def test_data_dependent_control_flow_names_the_module_and_what_to_try():
    with pytest.raises(CaptureError) as info:
        capture(_Outer(), (torch.randn(2, 4),))
    err = info.value
    assert err.node == "gate"
    assert "data-dependent control flow" in str(err) and "_Branchy" in str(err)
    assert "if x.sum() > 0" in str(err)
    assert "torch.where" in err.hint or "torch.cond" in err.hint
    assert "Traceback" not in err.format()
    assert err.__cause__ is not None  # the torch error is kept for debugging


@pytest.mark.parametrize("call,needle", [
    (lambda: capture(_Toy()), "example_inputs"),
    (lambda: capture(_Toy(), (torch.randn(2, 8),), mode="fast"), "mode"),
    (lambda: capture(tiny("bert"), mode="generate"), "plain"),
    (lambda: capture(_Toy(), (torch.randn(2, 3),)), "example_inputs"),
])
def test_misuse_is_a_capture_error_with_a_hint(call, needle):
    with pytest.raises(CaptureError) as info:
        call()
    assert needle in str(info.value) + (info.value.hint or "")
