import json

import pytest

from qdsl.eval.bench import (BenchError, bench_from_dir, is_trivial, load_bench, load_jsonl,
                             save_jsonl)
from qdsl.eval.stdlib import split_of

SRC = {
    "a.py": "import os\n\n\ndef f(x):\n    return (\n        x + 1\n    )\n\n\nclass A:\n    pass\n",
    "pkg/b.py": "x = 1\ny = 2\nz = [\n    x,\n    y,\n]\nprint(z)\n",
    "pkg/c.py": "# only a comment\n",
    "pkg/__pycache__/d.py": "junk = 1\nmore = 2\n",
}


@pytest.fixture
def code_dir(tmp_path):
    for rel, text in SRC.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_trivial_targets():
    for line in ("", "   ", ")", "    ]),", "}:", "\t)"):
        assert is_trivial(line), line
    for line in ("pass", "x = 1", "    return (", "# c"):
        assert not is_trivial(line), line


def test_samples_are_valid_and_skip_trivial(code_dir):
    samples = bench_from_dir(code_dir, n=100, seed=0)
    assert samples and len({s.id for s in samples}) == len(samples)
    for s in samples:
        assert not is_trivial(s.target) and s.context.endswith("\n")
        assert s.context.strip(), s                     # some non-blank context
        lines = SRC[s.path].split("\n")
        assert lines[s.line - 1] == s.target
        assert s.context == "\n".join(lines[:s.line - 1]) + "\n"
        assert "__pycache__" not in s.path
    # every non-trivial line after some content, each exactly once
    assert len(samples) == 5 + 5


def test_same_seed_same_jsonl(code_dir, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    save_jsonl(bench_from_dir(code_dir, 5, seed=3), a)
    save_jsonl(bench_from_dir(code_dir, 5, seed=3), b)
    assert a.read_bytes() == b.read_bytes()
    c = tmp_path / "c.jsonl"
    save_jsonl(bench_from_dir(code_dir, 5, seed=4), c)
    assert c.read_bytes() != a.read_bytes()


def test_round_robin_over_files(code_dir):
    samples = bench_from_dir(code_dir, 2, seed=0)
    assert {s.path for s in samples} == {"a.py", "pkg/b.py"}


def test_context_left_truncated_at_line_start(tmp_path):
    (tmp_path / "long.py").write_text("".join(f"x{i} = {i}\n" for i in range(100)))
    samples = bench_from_dir(tmp_path, 20, seed=1, max_chars=30)
    for s in samples:
        assert len(s.context) <= 30 or s.context.count("\n") == 1
        assert s.context.startswith("x")                  # a whole line
        i = s.line - 1
        assert s.context.endswith(f"x{i - 1} = {i - 1}\n")


def test_jsonl_round_trip_and_errors(code_dir, tmp_path):
    samples = bench_from_dir(code_dir, 7, seed=0)
    p = tmp_path / "b.jsonl"
    save_jsonl(samples, p)
    assert load_jsonl(p) == samples
    assert load_bench(str(p), n=3) == samples[:3]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x"}) + "\n")
    with pytest.raises(BenchError, match="bad.jsonl:1"):
        load_jsonl(bad)
    with pytest.raises(BenchError):
        load_bench(str(tmp_path / "missing"))


def test_stdlib_split_rules():
    assert split_of("test/test_os.py") == "test"
    assert split_of("idlelib/idle_test/test_run.py") == "test"
    assert split_of("lib2to3/tests/data/bom.py") == "test"
    assert split_of("unittest/test/testmock/support.py") == "test"
    assert split_of("os.py") in ("train", "valid")
    assert split_of("json/__init__.py") == split_of("json/__init__.py")
