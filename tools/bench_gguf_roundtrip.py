"""Round trip through llama.cpp: compile a GGUF-exportable recipe on SmolLM2, export it
with ``qdsl export --format gguf``, run the file in llama.cpp (its C API, through
``tools/llama_logits.c``, built here against libllama) and compare next-token logits
with qdsl's own run of the same artifact on N held-out stdlib prompts (the same token
ids fed to both): top-1 agreement, max |dlogit|, plus llama.cpp's tokenization of the
prompt texts against the tokenizer's and greedy decode speed side by side.

    PYTHONPATH=. .venv/bin/python tools/bench_gguf_roundtrip.py -o runs/gguf \
        [--recipe recipes/export/gguf_w8_group32.qrec] [--prompts 32] [--threads 1]

llama.cpp: ``--llama-src`` (a llama.cpp source tree: the llama-cpp-python sdist's
``vendor/llama.cpp``) configured in ``--llama-build``; libllama is built there with
``cmake --build BUILD --target llama -j2`` (niced) if missing. Writes OUT/result.json.
Not a unit test (it builds llama.cpp and runs a 135M model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import qdsl
from qdsl.atomic import write_json_atomic
from qdsl.eval.samples import load_bench
from qdsl.export import export

VENDOR = "/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp"
BUILD = "/work/llamacpp/build-native"


def build_tool(src: Path, build: Path, out: Path) -> Path:
    if not (build / "bin" / "libllama.so").exists():
        subprocess.run(["nice", "-n", "10", "cmake", "--build", str(build), "--target", "llama",
                        "-j2"], check=True)
    exe = out / "llama_logits"
    subprocess.run(["cc", "-O2", str(Path(__file__).with_name("llama_logits.c")),
                    "-I", str(src / "include"), "-I", str(src / "ggml" / "include"),
                    "-L", str(build / "bin"), "-lllama", f"-Wl,-rpath,{build / 'bin'}",
                    "-o", str(exe)], check=True)
    return exe


def prompts(tok, n: int, max_tokens: int) -> list[tuple[str, list[int]]]:
    """(text, ids) of n held-out stdlib completion contexts, cut to their last lines so
    that they fit max_tokens."""
    out = []
    for s in load_bench("stdlib", n=n, seed=0):
        lines = s.context.splitlines(keepends=True)
        text = "".join(lines[-12:])
        ids = tok(text, add_special_tokens=False)["input_ids"][-max_tokens:]
        out.append((tok.decode(ids), ids))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", required=True, type=Path)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", default="recipes/export/gguf_w8_group32.qrec")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--requantize", action="store_true",
                    help="export with --requantize (a recipe GGUF cannot carry exactly)")
    ap.add_argument("--qdsl-lower", choices=("fake", "int8"), default="fake",
                    help="qdsl's side: the exported (fake-quant) artifact, or the same recipe "
                         "compiled with --lower int8 (qdsl's integer runtime)")
    ap.add_argument("--llama-src", type=Path, default=Path(VENDOR))
    ap.add_argument("--llama-build", type=Path, default=Path(BUILD))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    exe = build_tool(a.llama_src, a.llama_build, a.out)

    art = a.out / "artifact"
    t0 = time.time()
    if not (art / "qdsl_artifact.json").exists():
        qdsl.compile(a.model, a.recipe).save(art)
    compile_s = time.time() - t0
    gguf_path = a.out / "model.gguf"
    t0 = time.time()
    rep = export(art, "gguf", gguf_path, model=a.model, requantize=a.requantize)
    export_s = time.time() - t0
    print(f"exported {gguf_path}: {rep['types']} ({rep['bytes'] / 2**20:.1f} MiB, {export_s:.1f} s)")

    if a.qdsl_lower == "int8":
        art8 = a.out / "artifact-int8"
        if not (art8 / "qdsl_artifact.json").exists():
            qdsl.compile(a.model, a.recipe, lower="int8").save(art8)
        q = qdsl.load(art8)
        q.tokenizer = q.tokenizer or qdsl.load(art, a.model).tokenizer
    else:
        q = qdsl.load(art, a.model)
    tok = q.tokenizer
    ps = prompts(tok, a.prompts, a.max_tokens)
    (a.out / "ids.txt").write_text("".join(" ".join(map(str, ids)) + "\n" for _, ids in ps))
    (a.out / "texts.txt").write_text("".join(t.encode().hex() + "\n" for t, _ in ps))
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    run = lambda *args: subprocess.run([str(exe), str(gguf_path), str(a.threads), *args],
                                       check=True, env=env, capture_output=True, text=True)
    run("tokenize", str(a.out / "texts.txt"), str(a.out / "llama_ids.txt"))
    llama_ids = [list(map(int, ln.split())) for ln in (a.out / "llama_ids.txt").read_text().splitlines()]
    hf_ids = [tok(t, add_special_tokens=False)["input_ids"] for t, _ in ps]
    same_tok = sum(x == y for x, y in zip(llama_ids, hf_ids))

    run("logits", str(a.out / "ids.txt"), str(a.out / "llama_logits.bin"))
    lc = np.fromfile(a.out / "llama_logits.bin", dtype=np.float32).reshape(len(ps), -1)
    lm = q.lm()
    with torch.no_grad():
        ql = np.stack([lm.logits(torch.tensor([ids]))[0, -1].float().numpy() for _, ids in ps])
    lc = lc[:, :ql.shape[1]]
    top1 = float((lc.argmax(1) == ql.argmax(1)).mean())
    dlogit = np.abs(lc - ql)

    # decode speed, interleaved per prompt: qdsl's greedy steps after prefill, then
    # llama.cpp's (one process per prompt; its model load and prefill are not timed)
    qdsl_decode_s = llama_decode_s = 0.0
    llama_tokens = 0
    one = a.out / "one.txt"
    with torch.inference_mode():
        for _, ids in ps:
            logits = lm.prefill(torch.tensor([ids]))
            t0 = time.perf_counter()
            for _ in range(a.decode_tokens):
                logits = lm.decode(int(logits.argmax()))
            qdsl_decode_s += time.perf_counter() - t0
            one.write_text(" ".join(map(str, ids)) + "\n")
            d = run("decode", str(one), str(a.decode_tokens)).stdout.split()
            llama_tokens, llama_decode_s = llama_tokens + int(d[1]), llama_decode_s + float(d[2])
    res = {"model": a.model, "recipe": a.recipe, "qdsl_lower": a.qdsl_lower, "prompts": len(ps), "max_tokens": a.max_tokens,
           "gguf_types": rep["types"], "gguf_bytes": rep["bytes"], "requantized": len(rep["requantized"]),
           "requantized_max_abs_error": max((r["max_abs_error"] for r in rep["requantized"]),
                                            default=0.0),
           "requantized_max_rel_rms_error": max((r["rel_rms_error"] for r in rep["requantized"]),
                                                default=0.0),
           "tokenizer_agreement": f"{same_tok}/{len(ps)}",
           "top1_agreement": top1, "max_abs_dlogit": float(dlogit.max()),
           "mean_abs_dlogit": float(dlogit.mean()),
           "max_abs_logit_qdsl": float(np.abs(ql).max()),
           "decode_tokens_per_prompt": a.decode_tokens,
           "llama_decode_tokens_per_s": llama_tokens / llama_decode_s,
           "decode_speed_ratio_llama_over_qdsl": (llama_tokens / llama_decode_s)
           / (len(ps) * a.decode_tokens / qdsl_decode_s),
           "qdsl_decode_tokens_per_s": len(ps) * a.decode_tokens / qdsl_decode_s,
           "threads": a.threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "load_average": os.getloadavg(), "compile_seconds": compile_s, "export_seconds": export_s}
    write_json_atomic(a.out / "result.json", res)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
