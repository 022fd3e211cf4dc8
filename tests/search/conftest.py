"""A saved tiny GPT-2 with its own byte-level BPE tokenizer and a directory of code: what
a whole ``qdsl search`` (calibration windows, measured held-out windows) needs, no downloads."""

from __future__ import annotations

import pytest

CODE = ("def f(x):\n    return x + 1\n\n\nclass A:\n    def g(self, y):\n        z = f(y) * 2\n"
        "        return [z, y, 'a', {1: 2}]\n\n\nfor i in range(10):\n    print(A().g(i))\n")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    import torch

    root = tmp_path_factory.mktemp("search_tiny")
    code = root / "code"
    code.mkdir()
    for i in range(4):
        (code / f"m{i}.py").write_text(CODE * (i + 2))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([CODE] * 10, vocab_size=300, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root
