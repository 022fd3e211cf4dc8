"""Evaluation: line-completion benchmarks, metrics, perplexity, HumanEval, robustness,
hosting cost.

* ``samples``: build a benchmark from a directory of .py files (or the stdlib test
  split), freeze it to JSONL, load it back.
* ``metrics``: exact match, edit similarity, perplexity, bits per byte, pass@k.
* ``complete``: score a ``qdsl.models.lm.CausalLM`` on a benchmark (greedy, KV cache).
* ``humaneval``: pass@1 with generated code run in a sandboxed subprocess.
* ``sandbox``: run untrusted Python under bubblewrap (own user, pid, network and
  mount namespaces, read-only view, limits, output cap); refuses without it.
* ``run``: what ``qdsl eval`` does: model or artifact vs its float baseline.
* ``robust``: completion under perturbed prompts (Wei et al. Table 7).
* ``hosting``: what ``qdsl bench`` measures: size, memory, latency vs fp32 and torch.ao;
  ``hosting_report``: its cost per prediction, table and plot.

The stdlib corpus itself is ``qdsl.models.stdlib``.

Submodules import torch lazily where they can; import what you use.
"""
