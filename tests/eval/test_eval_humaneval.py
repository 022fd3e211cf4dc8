from qdsl.eval.humaneval import load_problems, run_program, truncate


def test_truncate_at_next_top_level_statement():
    assert truncate("    return x\n\ndef g():\n    pass") == "    return x\n"
    assert truncate("    return x\n\n\nprint(f(1))") == "    return x\n\n"
    assert truncate("    return x") == "    return x"


def test_sandbox_runs_passes_failures_and_timeouts_out_of_process():
    assert run_program("assert 1 + 1 == 2\n") == (True, "passed")
    ok, why = run_program("assert 1 == 2, 'nope'\n")
    assert not ok and "AssertionError" in why
    assert run_program("while True:\n    pass\n", timeout=1.5) == (False, "timed out")
    ok, why = run_program("import numpy\n")                 # -I -S: no site-packages
    assert not ok and "numpy" in why


def test_problems_ship_with_the_package():
    probs = load_problems()
    assert len(probs) == 164 and probs[0]["task_id"] == "HumanEval/0"
    p = probs[0]
    body = "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n"
    assert run_program(p["prompt"] + body + "\n" + p["test"] + f"\ncheck({p['entry_point']})\n")[0]
