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
#include <cmath>
#include <cstdint>

namespace {

// the `isa` argument: kernels/cpu.py's ISA_GENERIC .. ISA_VNNI
constexpr int64_t ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_VNNI = 3;

constexpr int64_t MB = 4;   // activation rows per weight pass (the GEMV row kernels)
// a GEMV call's temporaries live in per-thread buffers up to this size, allocated beyond
constexpr int64_t kScratchBytes = 1 << 20;

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

// four horizontal sums at once: [sum(a0), sum(a1), sum(a2), sum(a3)] (the GEMV row kernels)
__attribute__((target("avx2")))
static inline __m128 reduce4_ps_256(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
static inline __m128 reduce4_ps(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  auto half = [](__m512 v) __attribute__((target("avx512f,avx512bw,avx512vl"))) {
    return _mm256_add_ps(_mm512_castps512_ps256(v),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  };
  return reduce4_ps_256(half(a0), half(a1), half(a2), half(a3));
}

// x quantized to 8 bits exactly as qdsl's fake-quant (quant/primitives.py choose_qparams +
// quantize, torch's fused fake-quant), per row (per token) or over the whole tensor:
//   symmetric:  s = max(max|x| / 127, 1e-8), zp = 0, grid [-127, 127]
//   asymmetric: lo = min(min x, 0), hi = max(max x, 0), s = max((hi - lo) / 255, 1e-8),
//               zp = clamp(0 - nearbyint(lo / s), 0, 255), grid [0, 255]
//   v = clamp(nearbyint(x * (1 / s)) + zp, qmin, qmax) - zp   (x_hat = v * s)
// v [M, K] (V: int8 for symmetric codes, int32 for asymmetric ones), xscale [M].
// the symmetric 8-bit scale of a row (or tensor) whose max |x| is amax
inline float sym_scale8(float amax) { return std::max(amax / 127.f, 1e-8f); }

// choose_qparams (quant/primitives.py) for the range [lo, hi] on the grid [qmin, qmax], in
// its float32 operations (quantize_rows here, qdsl_fakequant.cpp's dynamic_fake_quant):
//   symmetric:  s = max(max(|lo|, |hi|) / qmax, 1e-8), zp = 0
//   asymmetric: lo <= 0 <= hi widened, s = max((hi - lo) / (qmax - qmin), 1e-8),
//               zp = clamp(qmin - nearbyint(lo / s), qmin, qmax)
inline void qparams(float lo, float hi, float qmin, float qmax, bool sym, float* s, float* zp) {
  if (sym) {
    *s = std::max(std::max(std::fabs(lo), std::fabs(hi)) / qmax, 1e-8f);
    *zp = 0.f;
    return;
  }
  lo = std::min(lo, 0.f); hi = std::max(hi, 0.f);
  *s = std::max((hi - lo) / (qmax - qmin), 1e-8f);
  *zp = std::min(std::max(qmin - std::nearbyint(lo / *s), qmin), qmax);
}

template <typename V>
void quantize_rows(const float* x, int64_t M, int64_t K, bool per_token, bool sym,
                   V* v, float* xscale) {
  const int64_t R = per_token ? M : 1, L = per_token ? K : M * K;
  const float qmin = sym ? -127.f : 0.f, qmax = sym ? 127.f : 255.f;
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * L;
    float lo = xr[0], hi = xr[0];
    for (int64_t k = 1; k < L; ++k) { lo = std::min(lo, xr[k]); hi = std::max(hi, xr[k]); }
    float s, zp;
    qparams(lo, hi, qmin, qmax, sym, &s, &zp);
    const float inv = 1.f / s;
    for (int64_t k = 0; k < L; ++k) {
      const float q = std::min(std::max(std::nearbyint(xr[k] * inv) + zp, qmin), qmax);
      v[r * L + k] = V(q - zp);
    }
    if (per_token) xscale[r] = s;
    else for (int64_t m = 0; m < M; ++m) xscale[m] = s;
  }
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
