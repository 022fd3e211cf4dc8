"""The HumanEval sandbox holds: each escape of issue 13 item 1 as a bounded test.

CI runs these as root with bubblewrap installed by ``scripts/setup``; every program
is short and every run has a small timeout."""

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

import qdsl
from qdsl.cli import main
from qdsl.errors import SandboxError
from qdsl.eval import sandbox
from qdsl.eval.humaneval import load_problems, run_program
from qdsl.eval.sandbox import OUTPUT_CAP, run_python, sandbox_kind
from qdsl.study.sweep import SweepConfig

REPO = Path(qdsl.__file__).resolve().parents[1]


def run(code: str, **kw) -> sandbox.Outcome:
    return run_python(code, **kw)


def text(o: sandbox.Outcome) -> str:
    return (o.stdout + o.stderr).decode(errors="replace")


def pids_with(marker: str) -> list[int]:
    """Host pids whose command line contains ``marker``."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    out.append(int(pid))
            except OSError:
                continue
    return out


def test_the_sandbox_is_bubblewrap_here():
    kind = sandbox_kind()
    assert kind.startswith("bwrap"), kind
    if os.geteuid() == 0:
        assert f"uid {sandbox.SANDBOX_UID}" in kind
        assert run("import os; print(os.getuid(), os.geteuid())").stdout.split() == [b"65534"] * 2


@pytest.mark.parametrize("where", ["root", "venv", "repo", "host_tmp"])
def test_writes_outside_the_private_temp_dir_fail(where, tmp_path):
    tmp_path.chmod(0o777)
    d = {"root": Path("/root"), "venv": Path(sysconfig.get_paths()["purelib"]),
         "repo": REPO, "host_tmp": tmp_path}[where]
    target = d / f"qdsl_escape_{os.getpid()}_{where}.pth"
    try:
        o = run(f"open({str(target)!r}, 'w').write('import os')\n")
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)
    assert o.returncode != 0 and ("FileNotFoundError" in text(o) or "Errno 30" in text(o))
    # the program's own directory and /tmp are writable, and / is not
    assert run("open('/sandbox/a', 'w').write('x'); open('/tmp/b', 'w').write('x')").returncode == 0
    assert run("open('/escape', 'w')").returncode != 0


def test_every_writable_place_is_size_capped():
    """RAM-backed tmpfs with no cap would let a program fill the host's memory:
    /sandbox, /tmp and /dev/shm each stop at TMPFS_BYTES (files of 8 MiB, under
    the per-file limit, until the filesystem is full)."""
    o = run(f"""
import os
for d in ('/sandbox', '/tmp', '/dev/shm'):
    wrote = 0
    try:
        for i in range(64):
            with open(f'{{d}}/f{{i}}', 'wb') as fh:
                fh.write(b'x' * (8 << 20))
            wrote += 8 << 20
    except OSError as e:
        print(d, 'full', e.errno)
    assert wrote <= {sandbox.TMPFS_BYTES}, (d, wrote)
""", timeout=30)
    assert o.returncode == 0, text(o)
    assert text(o).split("\n")[:3] == [f"{d} full 28" for d in ("/sandbox", "/tmp", "/dev/shm")]


def test_host_secrets_are_not_readable(monkeypatch):
    monkeypatch.setenv("QDSL_TEST_SECRET", "hunter2-sandbox")
    o = run("print(open('/etc/shadow').read())")
    assert o.returncode != 0 and b"root:" not in o.stdout
    o = run(f"import os\nprint(dict(os.environ))\n"
            f"print(open('/proc/{os.getpid()}/environ', 'rb').read())\n")
    assert b"hunter2" not in o.stdout + o.stderr and o.returncode != 0
    o = run("import os\nfor p in os.listdir('/proc'):\n"
            "    if p.isdigit():\n"
            "        try: print(open(f'/proc/{p}/environ', 'rb').read())\n"
            "        except OSError: pass\n"
            "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n")
    assert b"hunter2" not in o.stdout and o.returncode == 0
    pids = json.loads(o.stdout.decode().splitlines()[-1])   # data, never eval'ed
    assert os.getpid() not in pids and max(pids) < 10   # only the sandbox's own pids


def test_the_program_cannot_kill_the_evaluator_or_other_processes():
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        o = run(f"import os\nfor pid in (os.getppid(), {os.getpid()}, {sleeper.pid}):\n"
                "    try:\n        os.kill(pid, 9); print('killed', pid)\n"
                "    except OSError as e:\n        print('no', pid, e.errno)\n")
        assert o.returncode == 0
        time.sleep(0.2)
        assert sleeper.poll() is None            # the unrelated process lives
        assert f"no {os.getpid()}" in text(o) and f"no {sleeper.pid}" in text(o)
    finally:
        sleeper.kill()
        sleeper.wait()
    # os.getppid() is the sandbox's own init: killing it ends only the sandbox


def test_no_network_no_host_unix_sockets(tmp_path):
    tmp_path.chmod(0o777)
    path = tmp_path / "host.sock"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(path))
    path.chmod(0o777)
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0qdsl-test-{os.getpid()}")
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    port = tcp.getsockname()[1]
    servers = (unix, abstract, tcp)
    for s in servers:
        s.listen(4)
        s.setblocking(False)
    try:
        o = run("import socket\n"
                f"for fam, addr in ((socket.AF_UNIX, {str(path)!r}),\n"
                f"                  (socket.AF_UNIX, '\\0qdsl-test-{os.getpid()}'),\n"
                f"                  (socket.AF_INET, ('127.0.0.1', {port}))):\n"
                "    s = socket.socket(fam)\n    s.settimeout(2)\n"
                "    try:\n        s.connect(addr); s.sendall(b'hi'); print('connected', addr)\n"
                "    except OSError as e:\n        print('refused', e.errno)\n")
        assert o.returncode == 0 and b"connected" not in o.stdout
        assert o.stdout.count(b"refused") == 3
        for s in servers:
            with pytest.raises(BlockingIOError):
                s.accept()
    finally:
        for s in servers:
            s.close()


@pytest.mark.parametrize("ends", ["timeout", "exit"])
def test_no_process_of_the_program_survives_it(ends):
    marker = f"qdsl-survivor-{os.getpid()}-{ends}"
    prog = ("import os, sys, time\n"
            "def sleeper():\n"
            f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', "
            f"'{marker}'])\n"
            "for _ in range(5):\n"           # plain forked children
            "    if os.fork() == 0:\n        sleeper()\n"
            "if os.fork() == 0:\n"           # a detached daemon: setsid + double fork
            "    os.setsid()\n    if os.fork() == 0:\n        sleeper()\n    os._exit(0)\n"
            "time.sleep(0.5)\n"
            + ("while True:\n    pass\n" if ends == "timeout" else "print('done')\n"))
    t = time.monotonic()
    o = run(prog, timeout=2)
    assert time.monotonic() - t < 6
    assert o.timed_out == (ends == "timeout")
    time.sleep(0.5)
    assert pids_with(marker) == []


def test_the_survivor_scan_would_see_a_survivor():
    """Control for the test above: without namespaces (--unsafe-exec) a detached
    child does outlive the run, and the scan finds it."""
    marker = f"qdsl-survivor-{os.getpid()}-control"
    prog = ("import os, sys\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        os.closerange(0, 3)\n"
            f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; "
            f"time.sleep(30)', '{marker}'])\n    os._exit(0)\n")
    sandbox._run_unsafe(prog, timeout=3)
    time.sleep(0.5)
    found = pids_with(marker)
    for pid in found:
        os.kill(pid, signal.SIGKILL)
    assert found


def test_a_fork_bomb_is_stopped_by_the_process_limit():
    prog = ("import os, time\nn = 0\ntry:\n"
            "    for _ in range(2000):\n"
            "        if os.fork() == 0:\n            time.sleep(30)\n            os._exit(0)\n"
            "        n += 1\n"
            "except OSError as e:\n    print('stopped', n, e.errno)\n")
    t = time.monotonic()
    o = run(prog, timeout=5)
    assert time.monotonic() - t < 8
    words = o.stdout.split()
    assert words[0] == b"stopped" and int(words[1]) < sandbox.PROCESSES
    # the kernel kills the namespace's ~60 processes asynchronously: give it a moment
    deadline = time.monotonic() + 3
    while pids_with("/sandbox/prog.py") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pids_with("/sandbox/prog.py") == []


def test_output_is_capped_and_not_buffered():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.monotonic()
    o = run("import sys\nb = b'x' * (1 << 20)\nfor _ in range(1024):\n"
            "    sys.stdout.buffer.write(b)\n", timeout=30)
    assert time.monotonic() - t < 10
    assert o.truncated and o.returncode is None
    assert len(o.stdout) + len(o.stderr) <= OUTPUT_CAP
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 << 10
    assert run_program("print('x' * (1 << 22))") == (False, "output over 1024 KiB: killed")


def test_memory_of_the_whole_tree_is_capped(monkeypatch):
    """64 processes under 2 GiB each would fit 128 GiB: the evaluator sums the tree's
    resident memory and kills the sandbox past TREE_BYTES (here lowered to 256 MiB,
    against 5 children of 100 MiB; each alone is far under RLIMIT_AS)."""
    monkeypatch.setattr(sandbox, "TREE_BYTES", 256 << 20)
    hog = ("import os, time\nfor _ in range(5):\n    if os.fork() == 0:\n"
           "        block = b'x' * (100 << 20)\n        time.sleep(30)\n"
           "        os._exit(0)\ntime.sleep(30)\n")
    t0 = time.monotonic()
    o = run(hog, timeout=20)
    assert o.over_memory and o.returncode is None and not o.timed_out
    assert time.monotonic() - t0 < 10
    assert run_program(hog, timeout=20) == (False, "memory over 256 MiB: killed")
    assert run("b = b'x' * (100 << 20)").returncode == 0  # one such child alone is fine


def test_humaneval_verdicts():
    p = load_problems()[2]   # truncate_number: the decimal part
    def prog(body):
        return p["prompt"] + body + "\n\n" + p["test"] + f"\ncheck({p['entry_point']})\n"
    assert run_program(prog("    return number % 1.0")) == (True, "passed")
    ok, why = run_program(prog("    return number"))
    assert not ok and "AssertionError" in why


@pytest.fixture
def no_bwrap(monkeypatch):
    """PATH is one empty directory (reachable by the sandbox user); ``fake(script)``
    puts a ``bwrap`` there."""
    bindir = Path(tempfile.mkdtemp(dir="/tmp", prefix="qdsl-nobwrap-"))
    bindir.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))

    def fake(script: str) -> None:
        (bindir / "bwrap").write_text(script)
        (bindir / "bwrap").chmod(0o755)
    yield fake
    shutil.rmtree(bindir)


def test_no_bubblewrap_refuses_unless_unsafe(no_bwrap):
    with pytest.raises(SandboxError, match="not installed.*--unsafe-exec"):
        run_program("print(1)")
    assert "rlimits only" in sandbox_kind(unsafe=True)
    assert run_program("assert 1 + 1 == 2", unsafe=True) == (True, "passed")
    ok, why = run_program("assert 1 == 2, 'nope'", unsafe=True)
    assert not ok and "nope" in why
    if os.geteuid() == 0:  # unsafe still drops root
        assert run_python("import os; print(os.getuid())", unsafe=True).stdout == b"65534\n"


def test_a_bwrap_that_cannot_start_is_refused_with_its_message(no_bwrap):
    no_bwrap("#!/bin/sh\n[ \"$1\" = --help ] && exit 0\n"
                                     "echo 'bwrap: setting up uid map: Permission denied' >&2\n"
                                     "exit 1\n")
    with pytest.raises(SandboxError, match="uid map: Permission denied"):
        sandbox_kind()


@pytest.mark.parametrize("cmd", [["eval", "no-such-model"],
                                 ["sweep", "--table", "wei-4", "--model", "no-such-model"]])
def test_cli_refuses_before_loading_anything(cmd, no_bwrap, tmp_path, capsys):
    rc = main([*cmd, "--humaneval", "1", "--no-progress", *(["-o", str(tmp_path / "o")]
                                                            if cmd[0] == "sweep" else [])])
    err = capsys.readouterr().err
    assert rc == 2 and "refusing to run generated code" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_unsafe_exec_flag_is_documented_and_reaches_the_sweep_config(capsys):
    for cmd in ("eval", "sweep"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "--unsafe-exec" in capsys.readouterr().out
    assert SweepConfig(unsafe_exec=True).unsafe_exec and not SweepConfig().unsafe_exec
