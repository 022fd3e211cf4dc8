"""qdsl's own fused CPU kernels (``qdsl_kernels.cpp``), built on first use with
``torch.utils.cpp_extension.load_inline`` and registered as ``torch.ops.qdsl_kernels``.

The build needs a C++ compiler (and ninja) at run time; torch caches it under its
extensions directory (``TORCH_EXTENSIONS_DIR``), keyed by the source (ninja also tracks
the header the sources include, ``qdsl_common.h``: editing it rebuilds), so it is built
once per machine (~1 minute) and loaded in well under a second afterwards. Where the
build fails (no compiler, a non-x86 CPU) ``load()`` returns False, logs why once, and
the kernel table falls back to torch's own kernels (never a crash).

torch guards a build with a lock *file* in the build folder, which a process killed
while building (Ctrl-C, a timeout) leaves behind: every later process would then wait
on it forever, silently. ``build`` holds an OS lock (``flock``, released when its holder
dies, however it dies) around torch's build, so a torch lock file found while holding it
belongs to no live qdsl process and is removed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import shutil
from pathlib import Path

import torch
from torch.utils import cpp_extension

try:
    import fcntl                 # POSIX: the build lock (build_lock)
except ImportError:              # elsewhere: torch's own lock file only
    fcntl = None

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("qdsl_kernels.cpp")
SHIMS = Path(__file__).with_name("qdsl_shims.cpp")   # C entry points (compiled.c_shims)
SOURCES = (SOURCE, *(Path(__file__).with_name(f) for f in
                     ("qdsl_gemm.cpp", "qdsl_w4a8.cpp", "qdsl_fakequant.cpp")),
           SHIMS)   # one extension, in this order
# included by the sources of both extensions (this one and binary.py's): the compiler
# finds it in this folder and torch's build (ninja) tracks it, so editing it rebuilds
HEADERS = (Path(__file__).with_name("qdsl_common.h"),)
NAME = "qdsl_kernels_v4"          # bump with an incompatible change of the op schemas
DISABLE_ENV = "QDSL_NO_CEXT"      # set to 1: never build (tests of the fallback)

# the reason the extension is unavailable, once known (None: loaded or not tried)
_why_not: list[str] = []


def why_not() -> str | None:
    """Why the extension could not be used, or None."""
    return _why_not[0] if _why_not else None


@functools.cache
def load() -> bool:
    """Build (first use) and load the extension; False (and the reason, logged once)
    where it cannot be: never raises."""
    reason = _precheck()
    if reason is None:
        try:
            _build()
            return True
        except Exception as e:  # noqa: BLE001 - any build failure means "use torch's kernels"
            reason = f"building qdsl's C++ kernels failed ({type(e).__name__}: " \
                     f"{str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''})"
    _why_not.append(reason)
    log.warning("%s; using torch's kernels instead", reason)
    return False


def _precheck() -> str | None:
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return f"qdsl's C++ kernels are disabled ({DISABLE_ENV} is set)"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"qdsl's C++ kernels are x86-64 only (this CPU: {platform.machine()})"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not on PATH) for qdsl's kernels"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401 - the pip package puts the binary on its own path
        except ImportError:
            return "ninja is not installed (pip install ninja) for qdsl's kernels"
        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    return None


def build(name: str, sources: tuple[Path, ...]) -> None:
    """Compile ``sources`` (concatenated, one translation unit) as the op library ``name``
    (a no-op once torch has it cached) and load it; they include ``HEADERS``."""
    with build_lock(name):
        _load_inline(name, sources)


def build_dir(name: str) -> Path:
    """The folder torch builds the extension ``name`` in (``TORCH_EXTENSIONS_DIR``, else
    its per-user cache)."""
    try:
        return Path(cpp_extension._get_build_directory(name, verbose=False))
    except AttributeError:       # a private helper: a torch without it
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
        return Path(root) / name


@contextlib.contextmanager
def build_lock(name: str):
    """Hold ``name``'s build lock (another process building it: wait, saying so), and
    remove torch's lock file where a process killed mid-build left it (see the module)."""
    if fcntl is None:            # not POSIX: torch's own lock file only
        yield
        return
    folder = build_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{name}.qdsl-lock", "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another process is building qdsl's C++ kernels (%s); waiting for it",
                        name)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            stale = folder / "lock"
            if stale.exists():
                log.warning("removing %s, left by a build that was interrupted", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_inline(name: str, sources: tuple[Path, ...]) -> None:
    cpp_extension.load_inline(name, cpp_sources=[p.read_text() for p in sources],
                              is_python_module=False,
                              extra_include_paths=sorted({str(h.parent) for h in HEADERS}),
                              extra_cflags=["-O3", "-fopenmp", "-DNDEBUG"],
                              extra_ldflags=["-fopenmp"], verbose=False)


def _build() -> None:
    if hasattr(torch.ops, "qdsl_kernels") and hasattr(torch.ops.qdsl_kernels, "dynamic_fake_quant"):
        return                                        # already registered in this process
    build(NAME, SOURCES)
    _register_fakes()


def _register_fakes() -> None:
    """Shape functions, so the ops trace (torch.compile / export) on fake tensors."""
    lib = "qdsl_kernels::"

    @torch.library.register_fake(lib + "w8_linear")
    def _(x, w, w_scale, bias, isa):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake(lib + "w8a8_linear")
    def _(xq, x_scale, x_zp, w, w_scale, w_rowsum, bias, isa):
        return x_scale.new_empty(xq.shape[0], w.shape[0])

    @torch.library.register_fake(lib + "w8a8_linear_cat")
    def _(xq, x_scale, x_zp, w, w_scale, w_rowsum, bias, isa):
        return x_scale.new_empty(xq.shape[0], sum(t.shape[0] for t in w))

    @torch.library.register_fake(lib + "w8a8_gemm")
    def _(xq, x_scale, x_zp, packed, n, w_scale, w_rowsum, bias, isa):
        return x_scale.new_empty(xq.shape[0], n)

    @torch.library.register_fake(lib + "w8a8_pack")
    def _(w):
        return w.new_empty((w.shape[0] + 15) // 16, (w.shape[1] + 1) // 2, 16, 2)

    @torch.library.register_fake(lib + "decode_attention")
    def _(q, k, v, mask, n, scale, isa=1):
        return q.new_empty(q.shape)

    @torch.library.register_fake(lib + "cached_decode_attention")
    def _(q, k, v, mask, cache_position, scale, isa=1):
        return q.new_empty(q.shape)

    @torch.library.register_fake(lib + "w4_linear")
    def _(x, packed, scale, gs, bias, isa):
        return x.new_empty(x.shape[0], packed.shape[0])

    @torch.library.register_fake(lib + "w4a8_linear")
    def _(x, packed, scale, gs, bias, per_token, isa):
        return x.new_empty(x.shape[0], packed.shape[0])

    @torch.library.register_fake(lib + "w4a8_linear_cat")
    def _(x, packed, scale, gs, bias, per_token, isa):
        return x.new_empty(x.shape[0], sum(p.shape[0] for p in packed))

    @torch.library.register_fake(lib + "fake_quant")
    def _(x, scale, zero_point, axis, qmin, qmax, isa):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "dynamic_fake_quant")
    def _(x, per_token, qmin, qmax, symmetric, isa):
        return torch.empty_like(x, memory_format=torch.contiguous_format)
