"""Canonical names and roles from graph structure, per family and per capture mode."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from qdsl.graph.capture import capture
from qdsl.graph.naming import ROLES, name_graph
from tests.tiny import CAUSAL, FAMILIES, tiny, tiny_captured

ATTN = ["attn.scores", "attn.probs", "attn.context", "attn.out"]
# family -> the names every block has (canonical suffixes after "block.N.")
BLOCK_NAMES = {
    "gpt2": ["ln_1", "attn.qkv", *ATTN, "res_attn", "ln_2", "mlp.c_fc", "mlp.act", "mlp.c_proj",
             "res_sum"],
    "codegen": ["ln_1", "attn.qkv", *ATTN, "mlp.c_fc", "mlp.act", "mlp.c_proj", "parallel_sum",
                "res_sum"],
    "gptj": ["ln_1", "attn.q", "attn.k", "attn.v", *ATTN, "mlp.c_fc", "mlp.act", "mlp.c_proj",
             "parallel_sum", "res_sum"],
    "llama": ["ln_1", "attn.q", "attn.k", "attn.v", *ATTN, "res_attn", "ln_2", "mlp.gate",
              "mlp.act", "mlp.up", "mlp.mul", "mlp.down", "res_sum"],
    "bert": ["attn.q", "attn.k", "attn.v", *ATTN, "res_attn", "ln_2", "mlp.c_fc", "mlp.act",
             "mlp.c_proj", "res_sum", "ln_out"],
}
OUTSIDE = {
    "gpt2": ["embed", "embed.pos", "embed.sum", "ln_f", "lm_head"],
    "codegen": ["embed", "ln_f", "lm_head"],
    "gptj": ["embed", "ln_f", "lm_head"],
    "llama": ["embed", "ln_f", "lm_head"],
    "bert": ["embed", "embed.type", "embed.sum.0", "embed.pos", "embed.sum", "embed.ln",
             "pooler.dense"],
}
# family -> role counts in one block
BLOCK_ROLES = {
    "gpt2": {"norm": 2, "linear": 4, "attn_scores": 1, "softmax": 1, "attn_context": 1,
             "act_fn": 1, "residual_add": 2},
    "codegen": {"norm": 1, "linear": 4, "attn_scores": 1, "softmax": 1, "attn_context": 1,
                "act_fn": 1, "residual_add": 1, "parallel_add": 1},
    "gptj": {"norm": 1, "linear": 6, "attn_scores": 1, "softmax": 1, "attn_context": 1,
             "act_fn": 1, "residual_add": 1, "parallel_add": 1},
    "llama": {"norm": 2, "linear": 7, "attn_scores": 1, "softmax": 1, "attn_context": 1,
              "act_fn": 1, "gated_mul": 1, "residual_add": 2},
    "bert": {"norm": 2, "linear": 6, "attn_scores": 1, "softmax": 1, "attn_context": 1,
             "act_fn": 1, "residual_add": 2},
}
MODES = [(f, "plain") for f in FAMILIES] + [(f, "generate") for f in CAUSAL]


def named(family, mode="plain"):
    model, cap = tiny_captured(family, mode)
    return model, cap, name_graph(cap)


@pytest.mark.parametrize("family,mode", MODES)
def test_names_in_graph_order(family, mode):
    _, _, graph = named(family, mode)
    expected = [f"block.{i}.{s}" for i in range(2) for s in BLOCK_NAMES[family]]
    assert graph.blocks == 2
    assert [n for n in graph.names() if n.startswith("block.")] == expected
    assert [n for n in graph.names() if not n.startswith("block.")] == OUTSIDE[family]


@pytest.mark.parametrize("family,mode", MODES)
def test_role_counts_per_block(family, mode):
    _, _, graph = named(family, mode)
    for block in range(2):
        roles = Counter(n.role for n in graph.nodes if n.block == block)
        assert roles == Counter(BLOCK_ROLES[family])
    assert {n.role for n in graph.nodes} <= set(ROLES)


@pytest.mark.parametrize("family", CAUSAL)
def test_plain_and_generate_graphs_share_names_and_modules(family):
    _, _, plain = named(family, "plain")
    _, _, gen = named(family, "generate")
    assert plain.module_map == gen.module_map
    assert [(n.name, n.role, n.op, n.module_type) for n in plain.nodes] == \
           [(n.name, n.role, n.op, n.module_type) for n in gen.nodes]
    assert plain.graph_hash != gen.graph_hash


@pytest.mark.parametrize("family,mode", MODES)
def test_fields_point_at_real_nodes_weights_and_modules(family, mode):
    model, cap, graph = named(family, mode)
    fx_nodes = {n.name: n for n in cap.gm.graph.nodes}
    params = dict(cap.gm.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    for item in graph.nodes:
        assert item.node in fx_nodes, item
        assert item.module in modules and type(modules[item.module]).__name__ == item.module_type
        assert graph.module_map[item.name] == item.module
        out = fx_nodes[item.node].meta["val"]
        if item.role == "linear":
            weight = params[item.weight]
            out_features = weight.shape[0] if item.weight_layout == "out_in" else weight.shape[1]
            assert out.shape[-1] == out_features, item
            if item.bias:
                assert params[item.bias].shape == (out_features,)
        elif item.role == "embedding":
            assert out.shape[-1] == params[item.weight].shape[1] and item.weight_layout is None
        else:
            assert item.weight is None and not item.has_weight
        assert item.has_activation


def test_gpt2_specifics_conv1d_layout_and_tied_head():
    _, cap, graph = named("gpt2")
    qkv = graph["block.0.attn.qkv"]
    assert (qkv.module, qkv.module_type, qkv.weight_layout) == \
        ("transformer.h.0.attn.c_attn", "Conv1D", "in_out")
    fx = {n.name: n for n in cap.gm.graph.nodes}
    assert str(fx[qkv.node].target) == "aten.view.default"       # after addmm: [B, T, 3D]
    assert fx[qkv.node].meta["val"].dim() == 3
    assert graph["embed"].tied == "lm_head" and graph["lm_head"].tied == "embed"
    assert graph["embed"].weight == graph["lm_head"].weight
    assert graph["block.1.mlp.act"].op == "gelu"


def test_llama_specifics_rmsnorm_output_and_gated_mlp():
    _, cap, graph = named("llama")
    ln = graph["block.0.ln_1"]
    assert (ln.op, ln.module_type, ln.weight) == ("rms_norm", "LlamaRMSNorm", None)
    fx = {n.name: n for n in cap.gm.graph.nodes}
    users = {u.name for u in fx[ln.node].users}
    assert {graph[f"block.0.attn.{p}"].node for p in "qkv"} <= users   # last node of the norm
    assert graph["block.0.mlp.act"].op == "silu"
    assert graph["block.0.mlp.mul"].op == "mul"
    assert graph["block.0.attn.k"].module == "model.layers.0.self_attn.k_proj"


def test_attention_nodes_follow_the_documented_choice():
    _, cap, graph = named("gpt2")
    fx = {n.name: n for n in cap.gm.graph.nodes}
    scores = fx[graph["block.0.attn.scores"].node]
    assert str(scores.target) == "aten.matmul.default"              # before scaling
    assert any(str(u.target) == "aten.mul.Tensor" for u in scores.users)
    context = fx[graph["block.0.attn.context"].node]
    assert context.meta["val"].shape[-1] == 32                      # heads merged: [B, T, D]


def test_graph_hash_ignores_weights_and_sees_structure():
    first = name_graph(capture(tiny("gpt2", seed=0))).graph_hash
    other_weights = name_graph(capture(tiny("gpt2", seed=5))).graph_hash
    _, _, llama = named("llama")
    assert first == other_weights == named("gpt2")[2].graph_hash
    assert first != llama.graph_hash


def test_to_json_round_trips():
    _, _, graph = named("llama", "generate")
    data = json.loads(json.dumps(graph.to_json()))
    assert data["blocks"] == 2 and data["nodes"][0]["name"] == "embed"
    assert graph["block.1.attn.q"].to_json()["weight_layout"] == "out_in"


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
        self.norm = torch.nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.fc2(torch.relu(self.fc1(x))))


def test_plain_module_nodes_keep_their_module_paths():
    graph = name_graph(capture(_Toy(), (torch.randn(2, 8),)))
    assert graph.names() == ["fc1", "fc2", "norm"]
    assert [n.role for n in graph.nodes] == ["linear", "linear", "norm"]
    assert graph.blocks == 0 and graph["fc1"].weight == "fc1.weight"


class _Mixer(torch.nn.Module):
    """Attention with unusual names: structure, not names, must find Q/K/V."""

    def __init__(self, d):
        super().__init__()
        self.wa, self.wb, self.wc, self.proj = (torch.nn.Linear(d, d) for _ in range(4))

    def forward(self, x):  # x: [B, T, D]
        s = self.wa(x) @ self.wb(x).transpose(-1, -2)
        p = torch.softmax(s / 4.0, dim=-1)
        return self.proj(p @ self.wc(x))


class _Layer(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.n1, self.mix, self.n2 = torch.nn.LayerNorm(d), _Mixer(d), torch.nn.LayerNorm(d)
        self.up, self.down = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)

    def forward(self, x):
        x = self.mix(self.n1(x)) + x
        return x + self.down(torch.relu(self.up(self.n2(x))))


class _Net(torch.nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.stack = torch.nn.ModuleList(_Layer(d) for _ in range(2))

    def forward(self, x):
        for layer in self.stack:
            x = layer(x)
        return x


def test_hand_written_transformer_is_named_by_structure():
    graph = name_graph(capture(_Net(), (torch.randn(2, 5, 16),)))
    assert graph.blocks == 2
    names = [n for n in graph.names() if n.startswith("block.1.")]
    assert sorted(names) == sorted("block.1." + s for s in
                                   ["ln_1", "attn.q", "attn.k", "attn.v", *ATTN, "res_attn",
                                    "ln_2", "mlp.c_fc", "mlp.act", "mlp.c_proj", "res_sum"])
    assert graph["block.1.attn.q"].module == "stack.1.mix.wa"
    assert graph["block.1.attn.v"].module == "stack.1.mix.wc"
    assert graph["block.1.mlp.act"].op == "relu"
