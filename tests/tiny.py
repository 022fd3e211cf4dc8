"""Tiny randomly initialised transformers models, one per family, for fast tests.

Never downloads: every model is built from a config. Hidden 32, 2 layers, vocab
128 (larger than any position table, so shapes never collide by accident).

    model = tiny("llama")          # LlamaForCausalLM, eval mode, eager attention
    ids = tiny_ids(model, 2, 8)    # [2, 8] token ids inside the vocabulary
"""

from __future__ import annotations

import torch
import transformers

VOCAB = 128
HIDDEN = 32
LAYERS = 2

# family -> (config class, model class, config kwargs)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=2, n_positions=64,
                  bos_token_id=0, eos_token_id=0)),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM",
                dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=2, n_positions=64, rotary_dim=8,
                     n_ctx=64, bos_token_id=0, eos_token_id=0)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM",
             dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=2, n_positions=64, rotary_dim=8,
                  bos_token_id=0, eos_token_id=0)),
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                   bos_token_id=0, eos_token_id=0, pad_token_id=0)),
    "bert": ("BertConfig", "BertModel",
             dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                  num_attention_heads=2, max_position_embeddings=64, pad_token_id=0)),
}
CAUSAL = ("gpt2", "codegen", "gptj", "llama")


def tiny_config(family: str, **overrides):
    config_cls, _, kwargs = FAMILIES[family]
    config = getattr(transformers, config_cls)(vocab_size=VOCAB, **{**kwargs, **overrides})
    config._attn_implementation = "eager"
    return config


def tiny(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny ``family`` model in eval mode, with deterministic random weights."""
    _, model_cls, _ = FAMILIES[family]
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(tiny_config(family, **overrides)).eval()


def tiny_ids(model: torch.nn.Module, batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    """Token ids [batch, seq] in the model's vocabulary (avoiding id 0, the pad id)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size, (batch, seq), generator=generator)


_CAPTURED: dict = {}


def tiny_captured(family: str, mode: str = "plain"):
    """``(model, capture(model, mode=mode))``, built once per test session."""
    from qdsl.graph.capture import capture

    if (family, mode) not in _CAPTURED:
        model = tiny(family)
        _CAPTURED[family, mode] = model, capture(model, mode=mode)
    return _CAPTURED[family, mode]


class Toy(torch.nn.Module):
    """Two linears and a relu, [B, 16] -> [B, 8]: the smallest graph a pass test needs."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))
