"""GGUF metadata: the architecture keys llama.cpp reads for LLaMA (SmolLM2),
Qwen2 and GPT-2, the tensor names (gguf-py's ``TensorNameMap``), LLaMA's q/k row
order, and the tokenizer (vocabulary, token types, merges, special tokens, chat
template) so that llama.cpp tokenizes as the artifact's tokenizer does.
"""

from __future__ import annotations

import json
import tempfile

import torch

from ..errors import ExportError

# transformers model_type -> (gguf MODEL_ARCH member, q/k rows reordered for llama.cpp's rope)
ARCHS = {"llama": ("LLAMA", True), "qwen2": ("QWEN2", False), "gpt2": ("GPT2", False)}


def arch_of(config) -> tuple[str, bool]:
    mt = getattr(config, "model_type", None)
    if mt not in ARCHS:
        raise ExportError(f"model type {mt!r} does not export to GGUF; supported: "
                          f"{', '.join(ARCHS)} (LLaMA-family such as SmolLM2, Qwen2.5, GPT-2)")
    return ARCHS[mt]


def rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """LLaMA's q / k projection rows in llama.cpp's order: within each head, the two
    rotary halves interleaved (row ``h, 2, d/2`` -> ``h, d/2, 2``). Works on any tensor
    whose first dimension is the rows (weights, codes, per-row scales)."""
    rest = w.shape[1:]
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *rest).transpose(1, 2)
            .reshape(w.shape))


def add_arch(writer, config, arch: str) -> None:
    """The hyper-parameters llama.cpp needs for ``arch``."""
    c = config
    writer.add_block_count(c.num_hidden_layers if arch != "GPT2" else c.n_layer)
    if arch == "GPT2":
        writer.add_context_length(c.n_positions)
        writer.add_embedding_length(c.n_embd)
        writer.add_feed_forward_length(c.n_inner or 4 * c.n_embd)
        writer.add_head_count(c.n_head)
        writer.add_layer_norm_eps(c.layer_norm_epsilon)
        return
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(c, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(c, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    if rope.get("rope_type", "default") not in ("default", None):
        raise ExportError(f"rope type {rope['rope_type']!r} is not exported (only default rope)")
    writer.add_vocab_size(c.vocab_size)


def tensor_names(arch: str, blocks: int):
    """gguf-py's map from transformers parameter names to GGUF tensor names."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch], blocks)

    def gguf_name(hf: str) -> str:
        got = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if got is None:
            raise ExportError(f"parameter {hf} has no GGUF tensor name for {arch.lower()}")
        return got
    return gguf_name


def pre_tokenizer(tokenizer, model_type: str) -> str:
    """llama.cpp's pre-tokenizer name for ``tokenizer``, from its own description (the
    regex that splits text before BPE): gpt-2 (plain byte-level), smollm (digits split
    one by one, then byte-level), qwen2 (Qwen2's split regex)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("the tokenizer is not a fast (tokenizers) BPE tokenizer")
    pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    kinds = [p.get("type") for p in pre.get("pretokenizers", [pre])]
    if kinds == ["ByteLevel"] and pre.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and pre["pretokenizers"][0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and model_type == "qwen2":
        return "qwen2"
    raise ExportError(f"tokenizer pre-tokenizer {json.dumps(pre)[:200]} is not one qdsl maps "
                      "to llama.cpp's (gpt-2, smollm, qwen2); export with --no-vocab")


def add_vocab(writer, tokenizer, config) -> dict:
    """Vocabulary, token types, merges, special ids and chat template; returns a summary."""
    import gguf

    model_type = config.model_type
    n_vocab = config.vocab_size
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ExportError(f"the tokenizer has ids up to {max(vocab.values())}, the model's "
                          f"embedding only {n_vocab} rows")
    by_id = {i: t for t, i in vocab.items()}
    added = {i: a for i, a in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    pre = pre_tokenizer(tokenizer, model_type)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="qdsl-vocab-") as d:
        tokenizer.save_pretrained(d)
        special = gguf.SpecialVocab(d, load_merges=True, n_vocab=n_vocab)
        if not special.merges:
            raise ExportError("the tokenizer has no BPE merges (tokenizer.json)")
        special.add_to_gguf(writer, quiet=True)
    return {"tokens": n_vocab, "pre": pre, "merges": len(special.merges),
            "special": dict(special.special_token_ids)}
