"""Build llama.cpp's ``llama-bench`` and ``llama-quantize`` from the ``llama-cpp-python``
source package (its vendored llama.cpp), for ``qdsl bench --llamacpp`` side by side,
and requantize a GGUF to the types the comparison uses.

    .venv/bin/python tools/build_llamacpp.py SDIST.tar.gz OUT_DIR [--isa native|avx2]
    .venv/bin/python tools/build_llamacpp.py --quantize OUT_DIR/bin MODEL.gguf GGUF_DIR

The sdist comes from the package index (``pip download --no-binary :all: --no-deps
llama-cpp-python``); nothing of llama.cpp is kept in this repository. ``--isa avx2``
builds without AVX-512 (GGML_NATIVE off, AVX2 + FMA + F16C on), the llama.cpp side
of a forced-AVX2 comparison. ``--quantize`` writes F32, Q8_0 and Q4_0 GGUFs from one
GGUF (``--allow-requantize``: the same weights, requantized, as in issue 15).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
from pathlib import Path

TARGETS = ("llama-bench", "llama-quantize")
TYPES = ("F32", "Q8_0", "Q4_0")


def _run(cmd: list[str], log) -> None:
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"failed (exit {proc.returncode}): {' '.join(cmd)}; see {log.name}")


def build(sdist: Path, out: Path, isa: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    src_root = out / "src"
    if not src_root.exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(src_root, filter="data")
    (vendor,) = src_root.glob("*/vendor/llama.cpp")
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
             "-DBUILD_SHARED_LIBS=ON"]
    if isa == "avx2":
        flags += ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
                  "-DGGML_F16C=ON", "-DGGML_AVX512=OFF"]
    else:
        flags += ["-DGGML_NATIVE=ON"]
    build_dir = out / f"build-{isa}"
    with open(out / f"build-{isa}.log", "w") as log:
        _run(["cmake", "-S", str(vendor), "-B", str(build_dir), *flags], log)
        _run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 1),
              "--target", *TARGETS], log)
    print(f"built {build_dir / 'bin'}")
    return build_dir / "bin"


def quantize(bin_dir: Path, model: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "quantize.log", "w") as log:
        for t in TYPES:
            _run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(model),
                  str(out / f"{model.stem.split('.')[0]}-{t}.gguf"), t], log)
    print(f"wrote {', '.join(TYPES)} GGUFs under {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="SDIST OUT_DIR, or with --quantize BIN MODEL DIR")
    ap.add_argument("--isa", choices=("native", "avx2"), default="native")
    ap.add_argument("--quantize", action="store_true")
    args = ap.parse_args()
    if args.quantize:
        if len(args.paths) != 3:
            ap.error("--quantize takes BIN_DIR MODEL.gguf OUT_DIR")
        quantize(*map(Path, args.paths))
    else:
        if len(args.paths) != 2:
            ap.error("takes SDIST.tar.gz OUT_DIR")
        build(Path(args.paths[0]), Path(args.paths[1]), args.isa)


if __name__ == "__main__":
    main()
