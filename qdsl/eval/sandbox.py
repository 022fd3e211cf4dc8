"""Run untrusted Python (HumanEval's generated programs) where it cannot reach the host.

``run_python(program)`` runs the program under bubblewrap (``bwrap``, the
distribution's package; ``scripts/setup`` installs it) and returns an ``Outcome``.
What holds, and why:

* Its own user. As root, bwrap is started as uid/gid 65534 (nobody, no
  supplementary groups) and makes a user namespace on top: inside, the program has
  no capabilities and outside it is nobody. As any other user, the namespace maps
  to that user (its files are then protected by the read-only view below).
  ``--disable-userns``: no further user namespaces inside.
* Namespaces (``--unshare-all``): pid (only the sandbox's processes are visible or
  killable; when the program exits or the sandbox is killed, the kernel kills every
  process left in it, detached or not), network (only its own loopback: no host
  port, no outside address, no abstract Unix socket), ipc, uts, cgroup, and mount.
* A filesystem of its own: read-only binds of ``/usr`` (``/bin``, ``/lib*`` as the
  host has them), ``/etc/ld.so.cache`` and the interpreter's prefix, a fresh ``/proc`` of the pid
  namespace, a minimal ``/dev``, and size-capped private tmpfs for the working
  directory ``/sandbox``, ``/tmp`` and ``/dev/shm``; ``/`` itself is read-only. Nothing else of
  the host exists inside: no ``/etc``, ``/root``, ``/home``, ``/run``, ``/var``,
  the host's ``/tmp``, the venv or the repository, so no host file can be written
  and no Unix socket on the filesystem (``docker.sock``) can be reached.
* An empty environment (``PATH``, ``LANG``) and the base interpreter (not the venv's)
  as ``python -I -S``: no site-packages, no user site, no ``PYTHON*`` variables.
  Where the sandbox user cannot reach it (pyenv under ``/root``, mode 0700) the
  system's ``/usr/bin/python3`` is used; the record names the interpreter.
* Limits set inside before the program starts: CPU seconds (per process, one more
  than the timeout), 2 GiB address space, 16 MiB per file, 64 open files, 64
  processes/threads (counted in the sandbox's own user namespace: a fork bomb gets
  EAGAIN), no core files; 64 MiB per tmpfs where bwrap has ``--size``.
* A wall-clock timeout: bwrap runs in its own session and the whole group is
  SIGKILLed (``--die-with-parent`` takes the namespace with it).
* Output: stdout and stderr are read in chunks; past ``OUTPUT_CAP`` bytes the
  sandbox is killed and the outcome says ``truncated``. Nothing more is kept.
* Memory of the whole tree: every ``WATCH_S`` the evaluator sums the resident memory
  of the sandbox's processes; past ``TREE_BYTES`` it kills the sandbox
  (``over_memory``). RLIMIT_AS bounds each process; this bounds them together.

Not covered: kernel bugs (no seccomp filter is installed), CPU and memory use by
the sandbox while it runs (bounded by the limits and the timeout, not isolated by
cgroups), reading what the bound ``/usr`` tree shows to everybody.

Without a working bwrap, ``run_python`` refuses (``SandboxError``, with bwrap's own
message) unless ``unsafe=True`` (``--unsafe-exec``; with a working bwrap the flag
changes nothing). Then the program runs with the same limits, in its own session
(killed as a group), in a private temporary directory and, as root, as uid 65534;
that does not hold against a hostile program: it sees the whole filesystem as that
user does, the network and loopback, every host process, and a child that leaves
the session (``setsid``) outlives the run.
"""

from __future__ import annotations

import functools
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from ..errors import SandboxError

TIMEOUT_S = 10.0
SANDBOX_UID = 65534          # nobody
MEM_BYTES = 2 << 30          # RLIMIT_AS
FILE_BYTES = 16 << 20        # RLIMIT_FSIZE
TMPFS_BYTES = 64 << 20       # each of /sandbox and /tmp
OPEN_FILES = 64
PROCESSES = 64               # RLIMIT_NPROC: tasks (threads too) of the sandbox user
OUTPUT_CAP = 1 << 20         # stdout + stderr bytes read before the sandbox is killed
TREE_BYTES = 3 << 30         # resident memory of all the sandbox's processes together
WATCH_S = 0.05               # how often the evaluator sums it
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
HINT = ("install bubblewrap (scripts/setup does: apt-get install bubblewrap), or pass "
        "--unsafe-exec to run generated code with resource limits only (it can then read "
        "and write what your user can, and use the network)")


@dataclass(frozen=True)
class Outcome:
    returncode: int | None   # None: killed by the evaluator (timeout or output cap)
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    truncated: bool = False  # more than OUTPUT_CAP bytes of output: killed
    over_memory: bool = False  # its processes held more than TREE_BYTES together: killed


# The program runs as `python -I -S -c LIMITS prog.py`: LIMITS lowers the limits and
# execs the interpreter on the program (no preexec_fn in a threaded parent).
_LIMITS = """\
import os, resource as r, sys
for k, v in ({limits}):
    r.setrlimit(k, (v, v))
os.execv(sys.executable, [sys.executable, '-I', '-S', sys.argv[1]])
"""


def _limits_code(timeout: float, nproc: int) -> str:
    """CPU seconds a little over the wall-clock timeout (per process: the timeout
    ends a single busy loop first), 2 GiB, 16 MiB files, 64 files, ``nproc`` tasks."""
    import resource as r

    lims = [(r.RLIMIT_CPU, math.ceil(timeout) + 1), (r.RLIMIT_AS, MEM_BYTES),
            (r.RLIMIT_FSIZE, FILE_BYTES), (r.RLIMIT_NOFILE, OPEN_FILES), (r.RLIMIT_CORE, 0),
            (r.RLIMIT_NPROC, nproc)]
    return _LIMITS.format(limits=", ".join(f"({k}, {v})" for k, v in lims) + ",")


def _dropping() -> bool:
    """Root starts bwrap as nobody: a user namespace made by root maps to root."""
    return os.geteuid() == 0


def _interpreters() -> list[tuple[str, tuple[str, ...]]]:
    """(interpreter, prefixes to bind) candidates, the base interpreter first. As root
    the base interpreter may sit where nobody cannot reach it (pyenv under /root);
    the system's python3 is the fallback."""
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    prefixes = tuple(dict.fromkeys(os.path.realpath(p) for p in
                                   (sys.base_prefix, sys.base_exec_prefix)))
    out = [(base, prefixes)]
    sys_py = shutil.which("python3", path="/usr/bin:/bin")
    if sys_py and os.path.realpath(sys_py) != base:
        out.append((os.path.realpath(sys_py), ("/usr",)))
    return out


_FINISH = ("--remount-ro", "/", "--chdir", "/sandbox")


def _bwrap_args(bwrap: str, features: frozenset, prefixes: tuple[str, ...]) -> list[str]:
    args = [bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session",
            "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--clearenv"]
    if "--disable-userns" in features:
        args.append("--disable-userns")
    for k, v in ENV.items():
        args += ["--setenv", k, v]
    args += ["--ro-bind", "/usr", "/usr"]
    for p in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(p):  # merged /usr: /lib -> usr/lib
            args += ["--symlink", os.readlink(p), p]
        elif os.path.isdir(p):
            args += ["--ro-bind", p, p]
    for p in prefixes:
        if p != "/usr" and not p.startswith("/usr/"):
            args += ["--ro-bind", p, p]
    if os.path.exists("/etc/ld.so.cache"):
        args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    args += ["--proc", "/proc", "--dev", "/dev"]
    for d in ("/sandbox", "/tmp", "/dev/shm"):  # /dev/shm: --dev makes it uncapped
        if "--size" in features:
            args += ["--size", str(TMPFS_BYTES)]
        args += ["--tmpfs", d]
    return args


@functools.cache
def _probe(bwrap: str | None, drop: bool) -> tuple[list[str], str] | str:
    """-> (bwrap argv prefix up to the interpreter, interpreter) of the first candidate
    that starts in the sandbox, or why none does."""
    if bwrap is None:
        return "bwrap (bubblewrap) is not installed"
    try:
        text = subprocess.run([bwrap, "--help"], capture_output=True, timeout=10,
                              env=ENV).stdout.decode(errors="replace")
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{bwrap} --help failed: {e}"
    features = frozenset(w for w in text.split() if w.startswith("--"))
    why = ""
    for py, prefixes in _interpreters():
        argv = _bwrap_args(bwrap, features, prefixes)
        try:
            p = subprocess.run([*argv, *_FINISH, "--", py, "-I", "-S", "-c", "pass"],
                               capture_output=True, timeout=20, env=ENV,
                               stdin=subprocess.DEVNULL, **_user_kwargs(drop))
        except (OSError, subprocess.TimeoutExpired) as e:
            why = why or f"{py}: {e}"
            continue
        if p.returncode == 0:
            return argv, py
        why = why or f"{py}: " + (p.stderr.decode(errors="replace").strip()[-300:]
                                  or f"exit {p.returncode}")
    return f"bwrap cannot start a sandbox here ({why})"


def _user_kwargs(drop: bool) -> dict:
    return {"user": SANDBOX_UID, "group": SANDBOX_UID, "extra_groups": []} if drop else {}


def sandbox_kind(unsafe: bool = False) -> str:
    """What ``run_python`` will use, for the record: raises ``SandboxError`` when the
    sandbox cannot be had and ``unsafe`` is False."""
    got = _probe(shutil.which("bwrap"), _dropping())
    if isinstance(got, tuple):
        who = f"uid {SANDBOX_UID}" if _dropping() else "own uid"
        return (f"bwrap ({who} in a user namespace; pid, net, mount, ipc namespaces; "
                f"read-only /usr; rlimits; output cap) {got[1]}")
    if unsafe:
        who = f"uid {SANDBOX_UID}, " if _dropping() else ""
        return f"{who}rlimits only (--unsafe-exec: no isolation; {got})"
    raise SandboxError(f"refusing to run generated code: {got}; {HINT}")


def _tasks_of(uid: int) -> int:
    """Tasks (processes and threads) whose real uid is ``uid``: RLIMIT_NPROC counts them."""
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/status") as fh:
                    st = dict(line.split(":", 1) for line in fh if ":" in line)
                if int(st["Uid"].split()[0]) == uid:
                    n += int(st["Threads"])
            except (OSError, KeyError, ValueError):
                continue
    return n


def run_python(program: str, timeout: float = TIMEOUT_S, unsafe: bool = False) -> Outcome:
    """Run ``program`` as ``python -I -S prog.py`` in the sandbox (see the module doc)."""
    got = _probe(shutil.which("bwrap"), _dropping())
    if not isinstance(got, tuple):
        sandbox_kind(unsafe)  # raises unless unsafe
        return _run_unsafe(program, timeout)
    argv, py = got
    fd = os.memfd_create("prog.py")
    try:
        os.write(fd, program.encode(errors="replace"))
        os.lseek(fd, 0, os.SEEK_SET)
        cmd = [*argv, "--file", str(fd), "/sandbox/prog.py", *_FINISH, "--", py, "-I", "-S",
               "-c", _limits_code(timeout, PROCESSES), "/sandbox/prog.py"]
        return _communicate(cmd, timeout, "/", pass_fds=(fd,), **_user_kwargs(_dropping()))
    finally:
        os.close(fd)


@functools.cache
def _plain_interpreter(drop: bool) -> str:
    """The first interpreter candidate that starts as the (dropped) user, for unsafe runs."""
    for py, _ in _interpreters():
        try:
            if subprocess.run([py, "-I", "-S", "-c", "pass"], capture_output=True, timeout=20,
                              env=ENV, cwd="/", **_user_kwargs(drop)).returncode == 0:
                return py
        except (OSError, subprocess.TimeoutExpired):
            continue
    raise SandboxError(f"no Python interpreter can be started as uid {SANDBOX_UID}: "
                       f"tried {', '.join(py for py, _ in _interpreters())}")


def _run_unsafe(program: str, timeout: float) -> Outcome:
    """Limits, its own session and (as root) uid nobody; no namespaces."""
    drop = _dropping()
    uid = SANDBOX_UID if drop else os.getuid()
    py = _plain_interpreter(drop)
    with tempfile.TemporaryDirectory(prefix="qdsl-he-") as d:
        with open(os.path.join(d, "prog.py"), "w", errors="replace") as fh:
            fh.write(program)
        if drop:
            os.chown(d, SANDBOX_UID, SANDBOX_UID)
        return _communicate([py, "-I", "-S", "-c",
                             _limits_code(timeout, _tasks_of(uid) + PROCESSES), "prog.py"],
                            timeout, d, **_user_kwargs(drop))


def _communicate(cmd: list[str], timeout: float, cwd: str, **kw) -> Outcome:
    """Run ``cmd`` in its own session; read at most OUTPUT_CAP bytes of output; kill the
    session's process group at the deadline, at the cap, and when it is done."""
    p = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True, **kw)
    out_fd, err_fd = p.stdout.fileno(), p.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    total, timed_out, truncated, over_memory = 0, False, False, False
    deadline = time.monotonic() + timeout
    exited_at, watched_at = None, 0.0
    sel = selectors.DefaultSelector()
    for f in (p.stdout, p.stderr):
        sel.register(f, selectors.EVENT_READ)
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if p.poll() is not None:  # output held open by a leftover: a short grace
                exited_at = exited_at or now
                if now - exited_at > 0.5:
                    break
            if now - watched_at >= WATCH_S:
                watched_at = now
                if _tree_rss(p.pid) > TREE_BYTES:
                    over_memory = True
                    break
            for key, _ in sel.select(min(WATCH_S, deadline - now)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                keep = min(len(chunk), OUTPUT_CAP - total)
                bufs[key.fd] += chunk[:keep]
                total += keep
                if keep < len(chunk):
                    truncated = True
                    break
            if truncated:
                break
    finally:
        sel.close()
        _kill_group(p.pid)
        p.wait()
        p.stdout.close()
        p.stderr.close()
    rc = None if (timed_out or truncated or over_memory) else p.returncode
    return Outcome(rc, bytes(bufs[out_fd]), bytes(bufs[err_fd]), timed_out, truncated,
                   over_memory)


def _tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants, from the host's /proc (the
    sandbox's pid namespace is visible from outside). RLIMIT_AS bounds one process;
    this bounds the tree (64 processes x 2 GiB would otherwise fit), where cgroups
    are not to be had."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (comm) "
        pid, ppid = int(name), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        rss[pid] = int(fields[21]) * page
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
