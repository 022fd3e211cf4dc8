"""The subcommands of ``qdsl``, in ``--help`` order (read by ``main`` and each command)."""

# Order and one-line summaries shown in `qdsl --help`. A command's module is
# imported only when that command runs, so `qdsl check` never imports torch.
COMMANDS = {
    "check": "check .qrec recipe files and report every error",
    "fmt": "print a recipe in canonical form (--write, --check)",
    "explain": "show what a recipe selects in a model, before any data",
    "compile": "calibrate and quantize a model from a recipe into an artifact",
    "eval": "score a model or artifact on line completion, perplexity, HumanEval",
    "compare": "two evaluated rows, paired: differences, confidence intervals, verdicts",
    "bench": "measure size, memory and latency against fp32 and torch.ao",
    "export": "write an artifact as GGUF (llama.cpp) or compressed-tensors (vLLM)",
    "train": "quantization-aware distillation of a recipe's student (XTC): an artifact",
    "sweep": "run many recipes (compile + eval + bench) and write result tables",
    "search": "find the mixed-precision recipe for a size or speed budget (.qrec)",
}
