"""Evaluation: line-completion benchmarks, metrics, perplexity, HumanEval.

* ``bench``: build a benchmark from a directory of .py files (or the stdlib test
  split), freeze it to JSONL, load it back.
* ``metrics``: exact match, edit similarity, perplexity, bits per byte, pass@k.
* ``complete``: score a ``qdsl.models.lm.CausalLM`` on a benchmark (greedy, KV cache).
* ``humaneval``: pass@1 with generated code run in a sandboxed subprocess.
* ``sandbox``: run untrusted Python under bubblewrap (own user, pid, network and
  mount namespaces, read-only view, limits, output cap); refuses without it.
* ``run``: what ``qdsl eval`` does: model or artifact vs its float baseline.
* ``stdlib``: the deterministic train / valid / test split of the stdlib.

Submodules import torch lazily where they can; import what you use.
"""
