// What qdsl's C++ kernels share: qdsl_kernels.cpp + qdsl_gemm.cpp (torch.ops.qdsl_kernels,
// built by cext.py) and qdsl_binary.cpp (torch.ops.qdsl_binary, built by binary.py) each
// #include this header; cext.build gives the compiler its folder and torch's build
// tracks it as a dependency of each source, so editing it rebuilds both extensions; its
// text is also part of the kernel table's key (tuning.machine_key), so the table is
// timed again.
//
// The instruction set is not detected here: every op takes it as its `isa` argument,
// chosen in Python (kernels/cpu.py, ISA_*) from the CPU's flags capped by torch's
// capability and ONEDNN_MAX_CPU_ISA, so ATEN_CPU_CAPABILITY=avx2 also forces these kernels
// to AVX2. Each path is compiled for its target with __attribute__((target)), so one
// build runs on every x86-64 CPU; `pick_isa` calls a path only where `isa` has it.
#pragma once

#include <torch/extension.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>

namespace {

// the `isa` argument: kernels/cpu.py's ISA_GENERIC .. ISA_VNNI
constexpr int64_t ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_VNNI = 3;

constexpr int64_t MB = 4;   // activation rows per weight pass (the GEMV row kernels)

// The path to run for `isa`: the highest one given (not null) that `isa` reaches. The
// paths of one op have one signature; its driver calls the one picked in its parallel loop.
template <typename F>
inline F pick_isa(int64_t isa, F generic, F avx2, F avx512 = nullptr, F vnni = nullptr) {
  if (isa >= ISA_VNNI && vnni) return vnni;
  if (isa >= ISA_AVX512 && avx512) return avx512;
  if (isa >= ISA_AVX2 && avx2) return avx2;
  return generic;
}

// horizontal sums of 8 lanes (inlined into the AVX2 and AVX-512 paths)
__attribute__((target("avx2")))
static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2")))
static inline int32_t hsum256i(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// An op's tensor argument: a contiguous CPU tensor of `dt` with `dim` dims, or an error
// naming the op and the argument.
inline void check_tensor(const at::Tensor& t, at::ScalarType dt, int64_t dim, const char* op,
                         const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dt && t.dim() == dim && t.is_contiguous(),
              op, ": ", what, " must be a contiguous CPU ", c10::toString(dt), " tensor of ",
              dim, " dims, got ", t.scalar_type(), " ", t.sizes());
}

}  // namespace
