// qdsl's fused CPU kernels (qdsl/runtime/kernels/cext.py builds this with
// torch.utils.cpp_extension.load_inline on first use and registers the ops below
// under torch.ops.qdsl_kernels).
//
// Every op reads the int8 / packed int4 weight once per block of up to 4 activation
// rows (decode is a GEMV: this is what makes it memory-bound, not op-bound), spreads
// the output rows over threads (at::parallel_for, OpenMP), and fuses the scales,
// zero-point correction and bias into the epilogue. The instruction set is an
// argument (`isa`, chosen in Python; qdsl_common.h): 0 generic C++, 1 AVX2 + FMA,
// 2 AVX-512 (F, BW), 3 AVX-512 with VNNI, each path compiled for its target.
//
// Ops (x float32 [M, K] contiguous, w int8 [N, K], scales float32):
//   w8_linear(x, w, w_scale[N], bias?, isa)                 y = (x @ w^T) * w_scale + bias
//   w8a8_linear(xq int8 [M,K], x_scale[M], x_zp int32[M]?, w, w_scale[N], w_rowsum int32[N]?,
//               bias?, isa)  y = (xq @ w^T - x_zp * rowsum) * x_scale * w_scale + bias,
//               the integer product accumulated exactly in int32, the epilogue fused;
//   w8a8_linear_cat(xq, x_scale, x_zp?, w[], w_scale[], w_rowsum?[], bias?[], isa)  the same
//               for several weights on one input, their outputs side by side [M, sum N]
//               rowsum = w.sum(1), needed with x_zp (the VNNI path, x + 128 as u8 into
//               vpdpbusd, sums the rows itself in the same pass and ignores it)
//   w4_linear(x, packed uint8 [N, K/2], scale[N, K/gs], gs, bias?, isa)
//               codes u in [0, 15] two per byte, low nibble first; w = (u - 8) * scale;
//               from 16 activation rows (AVX2 / AVX-512) a panel GEMM: 16-64 weight rows
//               dequantized at a time into a thread-local buffer, register-tiled FMAs
//   decode_attention(q [B,H,1,D], k, v [B,Hk,L,D], mask?, n, scale, isa=1)  one query
//               token's softmax(q k^T * scale + mask) v over the first n keys (AVX2 + FMA;
//               AVX-512 for D = 64 or 128 where isa allows); k / v float32, float16 or
//               bfloat16 (both the same; widened as read), q, mask and the output float32;
//               with few key/value heads for the threads, the keys split into chunks, merged
//   cached_decode_attention(q, k, v, mask?, cache_position int64 [T], scale, isa=1)  the same
//               with n = cache_position[-1] + 1 read here: a compiled decode step calls
//               it directly (static shapes, no Python op around it)
//   llama_decode_step(embed, embed_scale, token, norms[], w[], w_scale[], bias?[], k_cache[],
//               v_cache[], inv_freq, rope_scale, pos, heads, eps, scale, isa, a_bits=[])
//               a whole LLaMA decode step of w8a8, w4a8 and / or w4 weight-only linears
//               (batch 1, one token) in one parallel region; see its definition and
//               runtime/fused.py
// The same extension has qdsl_gemm.cpp (w8a8_pack / w8a8_gemm, prefill) and qdsl_w4a8.cpp
// (w4a8_linear / w4a8_linear_cat: 4-bit weights times 8-bit dynamic activations).
#include "qdsl_common.h"
#include <ATen/Parallel.h>
#include <omp.h>
#include <cmath>
#include <vector>

namespace {

// ---------------------------------------------------------------- w8 weight-only

void w8_rows_generic(const float* x, int64_t M, const int8_t* w, int64_t K,
                     int64_t n0, int64_t n1, float* acc /*[M, N] as y*/, int64_t N) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += xr[k] * float(wr[k]);
      acc[m * N + n] = s;
    }
  }
}

// Four weight rows per pass, each read in address order into its own accumulators, the
// four sums reduced together (see the w8a8 paths below, which share this shape); `rows`
// dispatches mm = 1..4 activation rows to a block instantiated for it.
template <int MM>
__attribute__((target("avx2,fma")))
void w8_avx2_block(const float* x, const int8_t* w, int64_t K, int64_t n0, int64_t n1,
                   float* y, int64_t N) {
  const int64_t K8 = K & ~int64_t(7);
  auto wvec = [](const int8_t* p) __attribute__((target("avx2,fma"))) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  };
  auto tail = [&](const float* xr, const int8_t* wr) {
    float s = 0.f;
    for (int64_t k = K8; k < K; ++k) s += xr[k] * float(wr[k]);
    return s;
  };
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const int8_t* wr = w + n * K;
    __m256 a[MM][4];
    for (int m = 0; m < MM; ++m)
      for (int j = 0; j < 4; ++j) a[m][j] = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j)
      for (int64_t k = 0; k < K8; k += 8) {
        const __m256 wf = wvec(wr + j * K + k);
        for (int m = 0; m < MM; ++m)
          a[m][j] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + m * K + k), a[m][j]);
      }
    for (int m = 0; m < MM; ++m) {
      _mm_storeu_ps(y + m * N + n, reduce4_ps_256(a[m][0], a[m][1], a[m][2], a[m][3]));
      if (K8 < K)
        for (int j = 0; j < 4; ++j) y[m * N + n + j] += tail(x + m * K, wr + j * K);
    }
  }
  for (; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    __m256 a[MM];
    for (int m = 0; m < MM; ++m) a[m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
      const __m256 wf = wvec(wr + k);
      for (int m = 0; m < MM; ++m) a[m] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + m * K + k), a[m]);
    }
    for (int m = 0; m < MM; ++m) y[m * N + n] = hsum256(a[m]) + tail(x + m * K, wr);
  }
}

template <int MM>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void w8_avx512_block(const float* x, const int8_t* w, int64_t K, int64_t n0, int64_t n1,
                     float* y, int64_t N) {
  const int64_t K16 = K & ~int64_t(15);
  const __mmask16 tail = K == K16 ? 0 : __mmask16((1u << (K - K16)) - 1);
  auto fma = [](__m512 a, const float* xr, const int8_t* wr, __mmask16 mk)
      __attribute__((target("avx512f,avx512bw,avx512vl"))) {
    const __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, wr)));
    return _mm512_fmadd_ps(wf, _mm512_maskz_loadu_ps(mk, xr), a);
  };
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const int8_t* wr = w + n * K;
    __m512 a[MM][4];
    for (int m = 0; m < MM; ++m)
      for (int j = 0; j < 4; ++j) a[m][j] = _mm512_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      for (int64_t k = 0; k < K16; k += 16) {
        const __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + j * K + k))));
        for (int m = 0; m < MM; ++m)
          a[m][j] = _mm512_fmadd_ps(wf, _mm512_loadu_ps(x + m * K + k), a[m][j]);
      }
      if (tail)
        for (int m = 0; m < MM; ++m) a[m][j] = fma(a[m][j], x + m * K + K16, wr + j * K + K16, tail);
    }
    for (int m = 0; m < MM; ++m)
      _mm_storeu_ps(y + m * N + n, reduce4_ps(a[m][0], a[m][1], a[m][2], a[m][3]));
  }
  for (; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    __m512 a[MM];
    for (int m = 0; m < MM; ++m) a[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16)
      for (int m = 0; m < MM; ++m)
        a[m] = fma(a[m], x + m * K + k, wr + k, k < K16 ? __mmask16(0xffff) : tail);
    for (int m = 0; m < MM; ++m) y[m * N + n] = _mm512_reduce_add_ps(a[m]);
  }
}

#define QDSL_ROWS_BY_MM(NAME, BLOCK, XT, YT)                                             \
  void NAME(const XT* x, int64_t M, const int8_t* w, int64_t K, int64_t n0, int64_t n1,  \
            YT* out, int64_t N) {                                                        \
    for (int64_t mb = 0; mb < M; mb += MB) {                                             \
      const XT* xb = x + mb * K;                                                         \
      YT* ob = out + mb * N;                                                             \
      switch (std::min(MB, M - mb)) {                                                    \
        case 1: BLOCK<1>(xb, w, K, n0, n1, ob, N); break;                                \
        case 2: BLOCK<2>(xb, w, K, n0, n1, ob, N); break;                                \
        case 3: BLOCK<3>(xb, w, K, n0, n1, ob, N); break;                                \
        default: BLOCK<4>(xb, w, K, n0, n1, ob, N); break;                               \
      }                                                                                  \
    }                                                                                    \
  }

QDSL_ROWS_BY_MM(w8_rows_avx2, w8_avx2_block, float, float)
QDSL_ROWS_BY_MM(w8_rows_avx512, w8_avx512_block, float, float)

// ---------------------------------------------------------------- w8a8 (exact int32)
// Generic, AVX2 and AVX-512: x widened to int16 once ([M, K]), each int8 weight chunk
// widened and multiplied in int16 pairs accumulated in int32 (vpmaddwd): exact. VNNI: x
// shifted to u8 once, vpdpbusd on the int8 weight as it is (below).

void w8a8_rows_generic(const int16_t* x, int64_t M, const int8_t* w, int64_t K,
                       int64_t n0, int64_t n1, int32_t* acc, int64_t N) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      int32_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += int32_t(x[m * K + k]) * int32_t(w[n * K + k]);
      acc[m * N + n] = s;
    }
}

// The SIMD paths have the w8 paths' shape: four weight rows per pass, each read in address
// order into its own accumulators (4 * mm independent chains the core overlaps; one chain
// per row plus a horizontal sum per row left the GEMV latency-bound, ~10 GB/s on an
// L2-resident weight), the four sums reduced together, the last N % 4 rows one at a time.
// x[m, k] * w[n, k] for k in [k0, K): the scalar K tail of the int16 paths
inline int32_t dot_tail(const int16_t* x, const int8_t* w, int64_t k0, int64_t K) {
  int32_t s = 0;
  for (int64_t k = k0; k < K; ++k) s += int32_t(x[k]) * int32_t(w[k]);
  return s;
}

__attribute__((target("avx2")))
static inline __m128i reduce4_epi32_256(__m256i a0, __m256i a1, __m256i a2, __m256i a3) {
  const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
  return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

// AVX2: int16 x, the weight widened to int16 (vpmaddwd: int16 products summed in pairs
// into int32, exact)
template <int MM>
__attribute__((target("avx2")))
void w8a8_avx2_block(const int16_t* x, const int8_t* w, int64_t K, int64_t n0, int64_t n1,
                     int32_t* acc, int64_t N) {
  const int64_t K16 = K & ~int64_t(15);
  auto wvec = [](const int8_t* p) __attribute__((target("avx2"))) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  };
  auto xvec = [](const int16_t* p) __attribute__((target("avx2"))) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  };
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const int8_t* wr = w + n * K;
    __m256i a[MM][4];
    for (int m = 0; m < MM; ++m)
      for (int j = 0; j < 4; ++j) a[m][j] = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j)
      for (int64_t k = 0; k < K16; k += 16) {
        const __m256i wv = wvec(wr + j * K + k);
        for (int m = 0; m < MM; ++m)
          a[m][j] = _mm256_add_epi32(a[m][j], _mm256_madd_epi16(xvec(x + m * K + k), wv));
      }
    for (int m = 0; m < MM; ++m) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(acc + m * N + n),
                       reduce4_epi32_256(a[m][0], a[m][1], a[m][2], a[m][3]));
      if (K16 < K)
        for (int j = 0; j < 4; ++j) acc[m * N + n + j] += dot_tail(x + m * K, wr + j * K, K16, K);
    }
  }
  for (; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    __m256i a[MM];
    for (int m = 0; m < MM; ++m) a[m] = _mm256_setzero_si256();
    for (int64_t k = 0; k < K16; k += 16) {
      const __m256i wv = wvec(wr + k);
      for (int m = 0; m < MM; ++m)
        a[m] = _mm256_add_epi32(a[m], _mm256_madd_epi16(xvec(x + m * K + k), wv));
    }
    for (int m = 0; m < MM; ++m) acc[m * N + n] = hsum256i(a[m]) + dot_tail(x + m * K, wr, K16, K);
  }
}
QDSL_ROWS_BY_MM(w8a8_rows_avx2, w8a8_avx2_block, int16_t, int32_t)

// AVX2, one activation row of symmetric 8-bit codes in [-127, 127] (the decode step's:
// decode_quantize clamps to +-127) against int8 weights, with no widening step:
// vpmaddubsw multiplies |w| (unsigned, 0..128: |-128| is 128 as a u8) by x carrying w's
// sign (vpsignb; |x| <= 127, so no negation overflows) and adds the pairs in int16, at most
// 2 * 128 * 127 = 32512 (never saturating); vpmaddwd against ones widens them to int32.
// Exact, and 32 weights a step for one load of each operand where the int16 path widens
// 16: on SmolLM2's tied head (576 -> 49152, cold, huge pages, Zen 4 forced to AVX2) 24 GB/s
// against the int16 path's 15-20 and the VNNI path's 21 (which also sums each row for its
// u8 shift). Four rows a pass in address order, as the other row kernels.
__attribute__((target("avx2")))
void w8a8_row1_avx2_s8(const int8_t* x, const int8_t* w, int64_t K, int64_t n0, int64_t n1,
                       int32_t* acc) {
  const int64_t K32 = K & ~int64_t(31);
  const __m256i ones = _mm256_set1_epi16(1);
  auto dot = [ones](const int8_t* wp, const int8_t* xp, __m256i a) __attribute__((target("avx2"))) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp));
    const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
    return _mm256_add_epi32(a, _mm256_madd_epi16(p, ones));
  };
  auto tail = [&](const int8_t* wr) {
    int32_t s = 0;
    for (int64_t k = K32; k < K; ++k) s += int32_t(x[k]) * int32_t(wr[k]);
    return s;
  };
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const int8_t* wr = w + n * K;
    __m256i a[4];
    for (int j = 0; j < 4; ++j) {
      a[j] = _mm256_setzero_si256();
      for (int64_t k = 0; k < K32; k += 32) a[j] = dot(wr + j * K + k, x + k, a[j]);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(acc + n), reduce4_epi32_256(a[0], a[1], a[2], a[3]));
    if (K32 < K)
      for (int j = 0; j < 4; ++j) acc[n + j] += tail(wr + j * K);
  }
  for (; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    __m256i a = _mm256_setzero_si256();
    for (int64_t k = 0; k < K32; k += 32) a = dot(wr + k, x + k, a);
    acc[n] = hsum256i(a) + tail(wr);
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
static inline __m256i half_sum(__m512i v) {
  return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}

// four horizontal sums at once: [sum(a0), sum(a1), sum(a2), sum(a3)]
__attribute__((target("avx512f,avx512bw,avx512vl")))
static inline __m128i reduce4_epi32(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
  __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(half_sum(a0), half_sum(a1)),
                                _mm256_hadd_epi32(half_sum(a2), half_sum(a3)));
  return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

// AVX-512 without VNNI: as AVX2, 32 K positions per step; the K tail a masked load
template <int MM>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void w8a8_avx512_block(const int16_t* x, const int8_t* w, int64_t K, int64_t n0, int64_t n1,
                       int32_t* acc, int64_t N) {
  const int64_t K32 = K & ~int64_t(31);
  const __mmask32 tail = K == K32 ? 0 : (~__mmask32(0)) >> (32 - (K - K32));
  auto dot = [&](__m512i a, const int16_t* xr, const int8_t* wr, int64_t k, __mmask32 mk)
      __attribute__((target("avx512f,avx512bw,avx512vl"))) {
    const __m512i wv = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mk, wr + k));
    return _mm512_add_epi32(a, _mm512_madd_epi16(_mm512_maskz_loadu_epi16(mk, xr + k), wv));
  };
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const int8_t* wr = w + n * K;
    __m512i a[MM][4];
    for (int m = 0; m < MM; ++m)
      for (int j = 0; j < 4; ++j) a[m][j] = _mm512_setzero_si512();
    for (int j = 0; j < 4; ++j) {
      for (int64_t k = 0; k < K32; k += 32) {
        const __m512i wv = _mm512_cvtepi8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + j * K + k)));
        for (int m = 0; m < MM; ++m)
          a[m][j] = _mm512_add_epi32(a[m][j],
                                     _mm512_madd_epi16(_mm512_loadu_si512(x + m * K + k), wv));
      }
      if (tail)
        for (int m = 0; m < MM; ++m) a[m][j] = dot(a[m][j], x + m * K, wr + j * K, K32, tail);
    }
    for (int m = 0; m < MM; ++m)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(acc + m * N + n),
                       reduce4_epi32(a[m][0], a[m][1], a[m][2], a[m][3]));
  }
  for (; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    __m512i a[MM];
    for (int m = 0; m < MM; ++m) a[m] = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 32)
      for (int m = 0; m < MM; ++m)
        a[m] = dot(a[m], x + m * K, wr, k, k < K32 ? ~__mmask32(0) : tail);
    for (int m = 0; m < MM; ++m) acc[m * N + n] = _mm512_reduce_add_epi32(a[m]);
  }
}
QDSL_ROWS_BY_MM(w8a8_rows_avx512, w8a8_avx512_block, int16_t, int32_t)

// VNNI: vpdpbusd multiplies 64 unsigned by 64 signed bytes and adds them in fours into
// int32 lanes, with no int16 step to saturate: x is shifted to u8 (x + 128, once per call
// by the driver) and the epilogue subtracts 128 * rowsum(w). The row sums come from the
// same pass (one more vpdpbusd of ones against each weight vector, shared by the mm
// activation rows), so callers need not keep them and a compiled graph has nothing to
// look up. No widening of the weight: a weight row costs one load and 1 + 1/mm vpdpbusd
// per 64 bytes. The K tail is a masked load (zeros add nothing), so every K is exact.
template <int MM>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
void w8a8_vnni_block(const uint8_t* x, const int8_t* w, int64_t K, int64_t n0, int64_t n1,
                     int32_t* acc, int64_t N, int32_t* rowsum) {
  const int64_t K64 = K & ~int64_t(63);
  const __mmask64 tail = K == K64 ? 0 : (~__mmask64(0)) >> (64 - (K - K64));
  const __m512i ones = _mm512_set1_epi8(1);
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const int8_t* wr = w + n * K;
    __m512i a[MM][4], r[4];
    for (int j = 0; j < 4; ++j) {
      r[j] = _mm512_setzero_si512();
      for (int m = 0; m < MM; ++m) a[m][j] = _mm512_setzero_si512();
    }
    for (int j = 0; j < 4; ++j) {        // row by row: the weight is read in address order
      const int8_t* wj = wr + j * K;
      for (int64_t k = 0; k < K64; k += 64) {
        const __m512i wv = _mm512_loadu_si512(wj + k);
        r[j] = _mm512_dpbusd_epi32(r[j], ones, wv);
        for (int m = 0; m < MM; ++m)
          a[m][j] = _mm512_dpbusd_epi32(a[m][j], _mm512_loadu_si512(x + m * K + k), wv);
      }
      if (tail) {
        const __m512i wv = _mm512_maskz_loadu_epi8(tail, wj + K64);
        r[j] = _mm512_dpbusd_epi32(r[j], ones, wv);
        for (int m = 0; m < MM; ++m)
          a[m][j] = _mm512_dpbusd_epi32(a[m][j], _mm512_maskz_loadu_epi8(tail, x + m * K + K64),
                                        wv);
      }
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(rowsum + n), reduce4_epi32(r[0], r[1], r[2], r[3]));
    for (int m = 0; m < MM; ++m)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(acc + m * N + n),
                       reduce4_epi32(a[m][0], a[m][1], a[m][2], a[m][3]));
  }
  for (; n < n1; ++n) {                                  // the last N % 4 rows, one by one
    const int8_t* wr = w + n * K;
    __m512i a[MM], r = _mm512_setzero_si512();
    for (int m = 0; m < MM; ++m) a[m] = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 64) {
      const __mmask64 mk = k < K64 ? ~__mmask64(0) : tail;
      const __m512i wv = _mm512_maskz_loadu_epi8(mk, wr + k);
      r = _mm512_dpbusd_epi32(r, ones, wv);
      for (int m = 0; m < MM; ++m)
        a[m] = _mm512_dpbusd_epi32(a[m], _mm512_maskz_loadu_epi8(mk, x + m * K + k), wv);
    }
    rowsum[n] = _mm512_reduce_add_epi32(r);
    for (int m = 0; m < MM; ++m) acc[m * N + n] = _mm512_reduce_add_epi32(a[m]);
  }
}

// x: u8 [M, K] (xq + 128); acc[m, n] = sum_k x[m, k] * w[n, k] and rowsum[n] = sum_k w[n, k],
// for n in [n0, n1) (each block of activation rows writes the same row sums)
void w8a8_rows_vnni(const uint8_t* x, int64_t M, const int8_t* w, int64_t K, int64_t n0,
                    int64_t n1, int32_t* acc, int64_t N, int32_t* rowsum) {
  for (int64_t mb = 0; mb < M; mb += MB) {
    const uint8_t* xb = x + mb * K;
    int32_t* ab = acc + mb * N;
    switch (std::min(MB, M - mb)) {
      case 1: w8a8_vnni_block<1>(xb, w, K, n0, n1, ab, N, rowsum); break;
      case 2: w8a8_vnni_block<2>(xb, w, K, n0, n1, ab, N, rowsum); break;
      case 3: w8a8_vnni_block<3>(xb, w, K, n0, n1, ab, N, rowsum); break;
      default: w8a8_vnni_block<4>(xb, w, K, n0, n1, ab, N, rowsum); break;
    }
  }
}

// ---------------------------------------------------------------- w4 packed

void w4_rows_generic(const float* x, int64_t M, const uint8_t* p, const float* sc, int64_t K,
                     int64_t gs, int64_t n0, int64_t n1, float* y, int64_t N) {
  const int64_t G = K / gs, KB = K / 2;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float total = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.f;
        for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
          uint8_t b = p[n * KB + k / 2];
          int q = int((k & 1) ? (b >> 4) : (b & 15)) - 8;
          s += x[m * K + k] * float(q);
        }
        total += s * sc[n * G + g];
      }
      y[m * N + n] = total;
    }
}

// AVX2 and AVX-512: the w8 paths' shape (four weight rows per pass, each in address order
// into its own accumulators, reduced together); per group, two accumulator chains (even
// and odd 16 / 32 codes) then one FMA by the group's scale.
#define QDSL_W4_ROWS_BY_MM(NAME, BLOCK)                                                    \
  void NAME(const float* x, int64_t M, const uint8_t* p, const float* sc, int64_t K,       \
            int64_t gs, int64_t n0, int64_t n1, float* y, int64_t N) {                     \
    for (int64_t mb = 0; mb < M; mb += MB) {                                               \
      const float* xb = x + mb * K;                                                        \
      float* yb = y + mb * N;                                                              \
      switch (std::min(MB, M - mb)) {                                                      \
        case 1: BLOCK<1>(xb, p, sc, K, gs, n0, n1, yb, N); break;                          \
        case 2: BLOCK<2>(xb, p, sc, K, gs, n0, n1, yb, N); break;                          \
        case 3: BLOCK<3>(xb, p, sc, K, gs, n0, n1, yb, N); break;                          \
        default: BLOCK<4>(xb, p, sc, K, gs, n0, n1, yb, N); break;                         \
      }                                                                                    \
    }                                                                                      \
  }

// one packed row against MM activation rows, accumulated into t[0..MM) (AVX2: 16 codes
// from 8 bytes per step; gs % 16 == 0, checked by the caller)
template <int MM>
__attribute__((target("avx2,fma")))
static inline void w4_row_avx2(const float* x, const uint8_t* pr, const float* scr, int64_t K,
                               int64_t gs, __m256* t) {
  const __m128i lo4 = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
  for (int64_t g = 0, G = K / gs; g < G; ++g) {
    __m256 a0[MM], a1[MM];
    for (int m = 0; m < MM; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(pr + k / 2));
      const __m128i v = _mm_sub_epi8(_mm_unpacklo_epi8(_mm_and_si128(b, lo4),
                                                       _mm_and_si128(_mm_srli_epi16(b, 4), lo4)),
                                     eight);                        // 16 codes, in order
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
      for (int m = 0; m < MM; ++m) {
        const float* xr = x + m * K + k;
        a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), a0[m]);
        a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), a1[m]);
      }
    }
    const __m256 s = _mm256_set1_ps(scr[g]);
    for (int m = 0; m < MM; ++m) t[m] = _mm256_fmadd_ps(_mm256_add_ps(a0[m], a1[m]), s, t[m]);
  }
}

template <int MM>
__attribute__((target("avx2,fma")))
void w4_avx2_block(const float* x, const uint8_t* p, const float* sc, int64_t K, int64_t gs,
                   int64_t n0, int64_t n1, float* y, int64_t N) {
  const int64_t G = K / gs, KB = K / 2;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    __m256 t[4][MM];
    for (int j = 0; j < 4; ++j) {
      for (int m = 0; m < MM; ++m) t[j][m] = _mm256_setzero_ps();
      w4_row_avx2<MM>(x, p + (n + j) * KB, sc + (n + j) * G, K, gs, t[j]);
    }
    for (int m = 0; m < MM; ++m)
      _mm_storeu_ps(y + m * N + n, reduce4_ps_256(t[0][m], t[1][m], t[2][m], t[3][m]));
  }
  for (; n < n1; ++n) {
    __m256 t[MM];
    for (int m = 0; m < MM; ++m) t[m] = _mm256_setzero_ps();
    w4_row_avx2<MM>(x, p + n * KB, sc + n * G, K, gs, t);
    for (int m = 0; m < MM; ++m) y[m * N + n] = hsum256(t[m]);
  }
}
QDSL_W4_ROWS_BY_MM(w4_rows_avx2, w4_avx2_block)

// AVX-512: 32 codes from 16 bytes per step; gs % 32 == 0 (checked by the caller)
template <int MM>
__attribute__((target("avx512f,avx512bw,avx512vl")))
static inline void w4_row_avx512(const float* x, const uint8_t* pr, const float* scr, int64_t K,
                                 int64_t gs, __m512* t) {
  const __m128i lo4 = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
  for (int64_t g = 0, G = K / gs; g < G; ++g) {
    __m512 a0[MM], a1[MM];
    for (int m = 0; m < MM; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(pr + k / 2));
      const __m128i l = _mm_and_si128(b, lo4), h = _mm_and_si128(_mm_srli_epi16(b, 4), lo4);
      const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_sub_epi8(_mm_unpacklo_epi8(l, h), eight)));
      const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_sub_epi8(_mm_unpackhi_epi8(l, h), eight)));
      for (int m = 0; m < MM; ++m) {
        const float* xr = x + m * K + k;
        a0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), a0[m]);
        a1[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), a1[m]);
      }
    }
    const __m512 s = _mm512_set1_ps(scr[g]);
    for (int m = 0; m < MM; ++m) t[m] = _mm512_fmadd_ps(_mm512_add_ps(a0[m], a1[m]), s, t[m]);
  }
}

template <int MM>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void w4_avx512_block(const float* x, const uint8_t* p, const float* sc, int64_t K, int64_t gs,
                     int64_t n0, int64_t n1, float* y, int64_t N) {
  const int64_t G = K / gs, KB = K / 2;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    __m512 t[4][MM];
    for (int j = 0; j < 4; ++j) {
      for (int m = 0; m < MM; ++m) t[j][m] = _mm512_setzero_ps();
      w4_row_avx512<MM>(x, p + (n + j) * KB, sc + (n + j) * G, K, gs, t[j]);
    }
    for (int m = 0; m < MM; ++m)
      _mm_storeu_ps(y + m * N + n, reduce4_ps(t[0][m], t[1][m], t[2][m], t[3][m]));
  }
  for (; n < n1; ++n) {
    __m512 t[MM];
    for (int m = 0; m < MM; ++m) t[m] = _mm512_setzero_ps();
    w4_row_avx512<MM>(x, p + n * KB, sc + n * G, K, gs, t);
    for (int m = 0; m < MM; ++m) y[m * N + n] = _mm512_reduce_add_ps(t[m]);
  }
}
// AVX-512 has the registers for 8 activation rows a pass (16 accumulators): at prefill
// each unpacked code is used twice as often as with 4
void w4_rows_avx512(const float* x, int64_t M, const uint8_t* p, const float* sc, int64_t K,
                    int64_t gs, int64_t n0, int64_t n1, float* y, int64_t N) {
  for (int64_t mb = 0; mb < M; mb += 8) {
    const float* xb = x + mb * K;
    float* yb = y + mb * N;
    switch (std::min<int64_t>(8, M - mb)) {
      case 1: w4_avx512_block<1>(xb, p, sc, K, gs, n0, n1, yb, N); break;
      case 2: w4_avx512_block<2>(xb, p, sc, K, gs, n0, n1, yb, N); break;
      case 3: w4_avx512_block<3>(xb, p, sc, K, gs, n0, n1, yb, N); break;
      case 4: w4_avx512_block<4>(xb, p, sc, K, gs, n0, n1, yb, N); break;
      case 5: w4_avx512_block<5>(xb, p, sc, K, gs, n0, n1, yb, N); break;
      case 6: w4_avx512_block<6>(xb, p, sc, K, gs, n0, n1, yb, N); break;
      case 7: w4_avx512_block<7>(xb, p, sc, K, gs, n0, n1, yb, N); break;
      default: w4_avx512_block<8>(xb, p, sc, K, gs, n0, n1, yb, N); break;
    }
  }
}

// ---------------------------------------------------------------- w4 packed, one token

// The fused decode step's w4 weight-only linears (docs/performance.md, session 42). The
// float GEMV above splits, re-centres, widens and converts every code to float (~24
// instructions a 32 codes on AVX2, which bound it there); here a token's input is
// rounded once to 16-bit codes with a scale per group of the weight's (w4_token16) and
// each row's nibbles multiply them as integers (vpmaddwd, vpdpwssd on VNNI: ~12
// instructions a 32 codes), an exact int32 sum per group times (the input's group scale
// x the weight's). The input's rounding error is at most 2^-16 of its group's largest
// |x|, finer than the bf16 rounding PackedLinear's compute_dtype admits.

__attribute__((target("avx2,fma")))
static inline float hmax256(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

// x [K] -> xq: 16-bit codes, per group of gs columns (gs % 32 == 0) at the scale
// xs[g] = the group's largest |x| / 32767 (0 for a group of zeros), rounded to nearest
// even; per 32 columns in the order [16 even | 16 odd], a packed row's low nibbles then
// its high ones
__attribute__((target("avx2,fma")))
void w4_token16(const float* x, int64_t K, int64_t gs, int16_t* xq, float* xs) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t g0 = 0, g = 0; g0 < K; g0 += gs, ++g) {
    __m256 m = _mm256_setzero_ps();
    for (int64_t k = g0; k < g0 + gs; k += 8)
      m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
    const float amax = hmax256(m);
    xs[g] = amax / 32767.f;
    const __m256 inv = _mm256_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
    for (int64_t b = g0; b < g0 + gs; b += 32) {
      alignas(32) int32_t q[32];
      for (int i = 0; i < 32; i += 8)     // cvtps: the rounding mode's nearest even
        _mm256_store_si256(reinterpret_cast<__m256i*>(q + i),
                           _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + b + i), inv)));
      for (int i = 0; i < 16; ++i) {
        xq[b + i] = int16_t(q[2 * i]);
        xq[b + 16 + i] = int16_t(q[2 * i + 1]);
      }
    }
  }
}

// one packed row against w4_token16's codes, into t: per 32 columns the 16 low nibbles
// (even columns) and the 16 high ones (odd), each re-centred (u - 8) and widened to
// int16, times the codes in pairs into int32 (VNNI: vpdpwssd; AVX2: vpmaddwd + vpaddd:
// the same sums); per group one convert and one FMA by the two scales. A pass of four
// rows reads them one after the other, each in address order (four rows interleaved
// step by step, sharing the input's loads, left the prefetchers four short streams and
// ran at ~9 GB/s)
#define QDSL_W4_16_ROW(NAME, TARGET, DOT)                                                     \
  __attribute__((target(TARGET)))                                                          \
  static inline __m256 NAME(const int16_t* xq, const float* xs, const uint8_t* pr,         \
                            const float* scr, int64_t K, int64_t gs) {                      \
    const __m128i lo4 = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);                       \
    __m256 t = _mm256_setzero_ps();                                                        \
    for (int64_t g = 0, G = K / gs; g < G; ++g) {                                          \
      __m256i a = _mm256_setzero_si256();                                                  \
      for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {                                \
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(pr + k / 2));   \
        const __m256i we = _mm256_cvtepi8_epi16(_mm_sub_epi8(_mm_and_si128(b, lo4), eight)); \
        const __m256i wo = _mm256_cvtepi8_epi16(                                           \
            _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), lo4), eight));                \
        a = DOT(a, we, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k)));      \
        a = DOT(a, wo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k + 16))); \
      }                                                                                    \
      t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_set1_ps(xs[g] * scr[g]), t);       \
    }                                                                                      \
    return t;                                                                              \
  }
#define QDSL_DOT16_AVX2(a, w, x) _mm256_add_epi32(a, _mm256_madd_epi16(w, x))
#define QDSL_DOT16_VNNI(a, w, x) _mm256_dpwssd_epi32(a, w, x)
QDSL_W4_16_ROW(w4_16_row_avx2, "avx2,fma", QDSL_DOT16_AVX2)
QDSL_W4_16_ROW(w4_16_row_vnni, "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni", QDSL_DOT16_VNNI)
#undef QDSL_DOT16_AVX2
#undef QDSL_DOT16_VNNI
#undef QDSL_W4_16_ROW

#define QDSL_W4_16_ROWS(NAME, ROW, TARGET)                                                   \
  __attribute__((target(TARGET)))                                                          \
  void NAME(const int16_t* xq, const float* xs, const uint8_t* p, const float* sc,          \
            int64_t K, int64_t gs, int64_t n0, int64_t n1, float* y) {                      \
    const int64_t G = K / gs, KB = K / 2;                                                  \
    int64_t n = n0;                                                                        \
    for (; n + 4 <= n1; n += 4) {                                                          \
      const __m256 t0 = ROW(xq, xs, p + n * KB, sc + n * G, K, gs);                        \
      const __m256 t1 = ROW(xq, xs, p + (n + 1) * KB, sc + (n + 1) * G, K, gs);            \
      const __m256 t2 = ROW(xq, xs, p + (n + 2) * KB, sc + (n + 2) * G, K, gs);            \
      const __m256 t3 = ROW(xq, xs, p + (n + 3) * KB, sc + (n + 3) * G, K, gs);            \
      _mm_storeu_ps(y + n, reduce4_ps_256(t0, t1, t2, t3));                                \
    }                                                                                      \
    for (; n < n1; ++n) y[n] = hsum256(ROW(xq, xs, p + n * KB, sc + n * G, K, gs));        \
  }
QDSL_W4_16_ROWS(w4_16_rows_avx2, w4_16_row_avx2, "avx2,fma")
QDSL_W4_16_ROWS(w4_16_rows_vnni, w4_16_row_vnni, "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")
#undef QDSL_W4_16_ROWS

// y[n] for n in [n0, n1) (AVX2 or VNNI, by `vnni`)
void w4_16_rows(bool vnni, const int16_t* xq, const float* xs, const uint8_t* p,
                const float* sc, int64_t K, int64_t gs, int64_t n0, int64_t n1, float* y) {
  (vnni ? w4_16_rows_vnni : w4_16_rows_avx2)(xq, xs, p, sc, K, gs, n0, n1, y);
}

// ---------------------------------------------------------------- w4 packed, prefill

// M >= W4_GEMM_MIN_M: the GEMV paths above unpack every code once per pass of 4 or 8
// activation rows. Here a panel of weight rows is dequantized once (codes times their
// group's scale, float32, thread-local; 16 to 64 rows, ~128 KB, so that every activation
// row is streamed once per panel from as few panels as L2 allows) and every activation
// row runs against it in register tiles: MR activation rows x 4 weight rows, one
// accumulator each, so a step loads MR + 4 vectors for 4 * MR FMAs. No copy of the
// weight outlives the call. (At M = 8 the 8-row GEMV pass is faster; from 16 the panel.)
constexpr int64_t W4_GEMM_MIN_M = 16, W4_PANEL = 16;

inline int64_t w4_panel_rows(int64_t K) {
  return std::clamp<int64_t>((131072 / (K * 4)) / 4 * 4, W4_PANEL, 64);
}

template <int MR>
__attribute__((target("avx512f,avx512bw,avx512vl")))
static inline void w4_tile_avx512(const float* x, int64_t K, const float* wb, float* y,
                                  int64_t N, int64_t nvalid) {
  __m512 a[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) a[m][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {            // K % 32 == 0 (checked by the caller)
    const __m512 w0 = _mm512_loadu_ps(wb + k), w1 = _mm512_loadu_ps(wb + K + k),
                 w2 = _mm512_loadu_ps(wb + 2 * K + k), w3 = _mm512_loadu_ps(wb + 3 * K + k);
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      a[m][0] = _mm512_fmadd_ps(w0, xv, a[m][0]);
      a[m][1] = _mm512_fmadd_ps(w1, xv, a[m][1]);
      a[m][2] = _mm512_fmadd_ps(w2, xv, a[m][2]);
      a[m][3] = _mm512_fmadd_ps(w3, xv, a[m][3]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    alignas(16) float out[4];
    _mm_store_ps(out, reduce4_ps(a[m][0], a[m][1], a[m][2], a[m][3]));
    for (int j = 0; j < nvalid; ++j) y[m * N + j] = out[j];
  }
}

template <int MR>
__attribute__((target("avx2,fma")))
static inline void w4_tile_avx2(const float* x, int64_t K, const float* wb, float* y,
                                int64_t N, int64_t nvalid) {
  __m256 a[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) a[m][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    const __m256 w0 = _mm256_loadu_ps(wb + k), w1 = _mm256_loadu_ps(wb + K + k),
                 w2 = _mm256_loadu_ps(wb + 2 * K + k), w3 = _mm256_loadu_ps(wb + 3 * K + k);
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      a[m][0] = _mm256_fmadd_ps(w0, xv, a[m][0]);
      a[m][1] = _mm256_fmadd_ps(w1, xv, a[m][1]);
      a[m][2] = _mm256_fmadd_ps(w2, xv, a[m][2]);
      a[m][3] = _mm256_fmadd_ps(w3, xv, a[m][3]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    alignas(16) float out[4];
    _mm_store_ps(out, reduce4_ps_256(a[m][0], a[m][1], a[m][2], a[m][3]));
    for (int j = 0; j < nvalid; ++j) y[m * N + j] = out[j];
  }
}

// rows [n, n + rows) dequantized into wb [panel, K] (rows past them zero)
__attribute__((target("avx2,fma")))
static void w4_dequant_panel(const uint8_t* p, const float* sc, int64_t K, int64_t gs,
                             int64_t n, int64_t rows, int64_t panel, float* wb) {
  const int64_t G = K / gs, KB = K / 2;
  const __m128i lo4 = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
  for (int64_t j = 0; j < rows; ++j) {
    const uint8_t* pr = p + (n + j) * KB;
    float* out = wb + j * K;
    for (int64_t g = 0; g < G; ++g) {
      const __m256 s = _mm256_set1_ps(sc[(n + j) * G + g]);
      for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(pr + k / 2));
        const __m128i v = _mm_sub_epi8(
            _mm_unpacklo_epi8(_mm_and_si128(b, lo4), _mm_and_si128(_mm_srli_epi16(b, 4), lo4)),
            eight);                                            // 16 codes, in order
        _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), s));
        _mm256_storeu_ps(out + k + 8, _mm256_mul_ps(
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))), s));
      }
    }
  }
  std::fill(wb + rows * K, wb + ((rows + 3) / 4 * 4) * K, 0.f);
}

// the panel driver for rows [n0, n1); MRMAX activation rows a tile (AVX-512 4, AVX2 3:
// 12 of its 16 registers accumulate; 6 on AVX-512 measured no faster than 4)
template <int MRMAX, void (*TILE1)(const float*, int64_t, const float*, float*, int64_t, int64_t),
          void (*TILEMAX)(const float*, int64_t, const float*, float*, int64_t, int64_t)>
static void w4_gemm_rows(const float* x, int64_t M, const uint8_t* p, const float* sc,
                         int64_t K, int64_t gs, int64_t n0, int64_t n1, float* y, int64_t N) {
  static thread_local std::vector<float> tls;
  const int64_t panel = w4_panel_rows(K);
  tls.resize(panel * K);
  float* wb = tls.data();
  for (int64_t n = n0; n < n1; n += panel) {
    const int64_t rows = std::min(panel, n1 - n);
    w4_dequant_panel(p, sc, K, gs, n, rows, panel, wb);
    for (int64_t m = 0; m < M; m += (M - m >= MRMAX ? MRMAX : 1)) {
      const bool full = M - m >= MRMAX;
      for (int64_t t = 0; t < rows; t += 4)
        (full ? TILEMAX : TILE1)(x + m * K, K, wb + t * K, y + m * N + n + t, N,
                                 std::min<int64_t>(4, rows - t));
    }
  }
}

void w4_gemm_avx512(const float* x, int64_t M, const uint8_t* p, const float* sc, int64_t K,
                    int64_t gs, int64_t n0, int64_t n1, float* y, int64_t N) {
  w4_gemm_rows<4, w4_tile_avx512<1>, w4_tile_avx512<4>>(x, M, p, sc, K, gs, n0, n1, y, N);
}

void w4_gemm_avx2(const float* x, int64_t M, const uint8_t* p, const float* sc, int64_t K,
                  int64_t gs, int64_t n0, int64_t n1, float* y, int64_t N) {
  w4_gemm_rows<3, w4_tile_avx2<1>, w4_tile_avx2<3>>(x, M, p, sc, K, gs, n0, n1, y, N);
}

// ---------------------------------------------------------------- drivers

int64_t grain(int64_t K) { return std::max<int64_t>(8, 65536 / std::max<int64_t>(K, 1)); }

void check(const at::Tensor& t, at::ScalarType dt, int64_t dim, const char* what) {
  check_tensor(t, dt, dim, "qdsl_kernels", what);
}

void epilogue_bias(at::Tensor& y, const c10::optional<at::Tensor>& bias) {
  if (bias.has_value() && bias->defined()) y.add_(*bias);
}

at::Tensor w8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                     const c10::optional<at::Tensor>& bias, int64_t isa) {
  check(x, at::kFloat, 2, "x"); check(w, at::kChar, 2, "w"); check(w_scale, at::kFloat, 1, "w_scale");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K && w_scale.size(0) == N, "qdsl_kernels.w8_linear: shape mismatch");
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>(); const int8_t* wp = w.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  const auto rows = pick_isa(isa, w8_rows_generic, w8_rows_avx2, w8_rows_avx512);
  at::parallel_for(0, N, grain(K), [&](int64_t n0, int64_t n1) {
    rows(xp, M, wp, K, n0, n1, yp, N);
  });
  y.mul_(w_scale);
  epilogue_bias(y, bias);
  return y;
}

// y[m, n0:n1] = (acc - (shift + zp[m]) * rowsum) * x_scale[m] * w_scale + bias, in the
// thread's own columns right after its dot products (cache-hot; no int32 -> float pass).
void w8a8_epilogue(const int32_t* acc, int64_t M, int64_t N, int64_t n0, int64_t n1,
                   const float* xs, const int32_t* zp, int32_t shift, const int32_t* rowsum,
                   const float* ws, const float* b, float* y) {
  for (int64_t m = 0; m < M; ++m) {
    const int32_t c = shift + (zp ? zp[m] : 0);
    const int32_t* am = acc + m * N;
    float* ym = y + m * N;
    for (int64_t n = n0; n < n1; ++n) {
      const int32_t v = rowsum ? am[n] - c * rowsum[n] : am[n];
      const float t = float(v) * xs[m] * ws[n];
      ym[n] = b ? t + b[n] : t;
    }
  }
}


// one weight of a w8a8 call: its rows [off, off + n) of the output
struct W8a8Seg {
  const int8_t* w; const float* ws; const int32_t* rowsum; const float* bias;
  int64_t n, off;
};

// y [M, N] = the segments' outputs side by side, one pass over the rows of all of them
// (threads split the N rows of the whole, not each weight's); xq checked by the caller
at::Tensor w8a8_run(const at::Tensor& xq, const at::Tensor& x_scale, const int32_t* zp,
                    const std::vector<W8a8Seg>& segs, int64_t N, int64_t isa) {
  const int64_t M = xq.size(0), K = xq.size(1);
  const bool vnni = isa >= ISA_VNNI;
  // the VNNI path sums the weight rows itself (its shift by 128 needs them); the others
  // take the caller's, needed only with a zero point. Temporaries of a small call
  // (decode) live in per-thread buffers: four at::empty were ~1.5 us of a ~3.6 us call
  const bool small = (M * N + N) * 4 + M * K * 2 <= kScratchBytes;
  at::Tensor held[3];
  auto buffer = [&](std::vector<uint8_t>& tls, int i, int64_t bytes) -> void* {
    if (small) {
      if (int64_t(tls.size()) < bytes) tls.resize(bytes);
      return tls.data();
    }
    held[i] = at::empty({bytes}, xq.options().dtype(at::kByte));
    return held[i].data_ptr();
  };
  static thread_local std::vector<uint8_t> tls_acc, tls_rowsum, tls_x;
  int32_t* ap = static_cast<int32_t*>(buffer(tls_acc, 0, M * N * 4));
  int32_t* rs_all = vnni ? static_cast<int32_t*>(buffer(tls_rowsum, 1, N * 4)) : nullptr;
  const void* xv;
  const int8_t* xsrc = xq.data_ptr<int8_t>();
  if (vnni) {                                  // x + 128 as u8: flip the sign bit
    uint8_t* dst = static_cast<uint8_t*>(buffer(tls_x, 2, M * K));
    const uint8_t* src = reinterpret_cast<const uint8_t*>(xsrc);
    for (int64_t i = 0; i < M * K; ++i) dst[i] = src[i] ^ 0x80;
    xv = dst;
  } else {
    int16_t* dst = static_cast<int16_t*>(buffer(tls_x, 2, M * K * 2));
    for (int64_t i = 0; i < M * K; ++i) dst[i] = xsrc[i];
    xv = dst;
  }
  at::Tensor y = at::empty({M, N}, x_scale.options());
  const float* xs = x_scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int32_t shift = vnni ? 128 : 0;
  const auto rows16 = pick_isa(isa, w8a8_rows_generic, w8a8_rows_avx2, w8a8_rows_avx512);
  at::parallel_for(0, N, grain(K), [&](int64_t n0, int64_t n1) {
    for (const W8a8Seg& g : segs) {            // each weight's rows in this chunk
      const int64_t a = std::max(n0, g.off) - g.off, b = std::min(n1, g.off + g.n) - g.off;
      if (a >= b) continue;
      int32_t* rs = vnni ? rs_all + g.off : (zp ? const_cast<int32_t*>(g.rowsum) : nullptr);
      if (vnni)
        w8a8_rows_vnni(static_cast<const uint8_t*>(xv), M, g.w, K, a, b, ap + g.off, N, rs);
      else
        rows16(static_cast<const int16_t*>(xv), M, g.w, K, a, b, ap + g.off, N);
      w8a8_epilogue(ap + g.off, M, N, a, b, xs, zp, shift, rs, g.ws, g.bias, yp + g.off);
    }
  });
  return y;
}

// checks one weight of a w8a8 call against K and the zero point; -> its segment at off
W8a8Seg w8a8_seg(const at::Tensor& w, const at::Tensor& w_scale,
                 const c10::optional<at::Tensor>& w_rowsum, const c10::optional<at::Tensor>& bias,
                 int64_t K, bool has_zp, int64_t off) {
  check(w, at::kChar, 2, "w"); check(w_scale, at::kFloat, 1, "w_scale");
  const int64_t N = w.size(0);
  TORCH_CHECK(w.size(1) == K && w_scale.size(0) == N, "qdsl_kernels.w8a8_linear: shape mismatch");
  const bool has_rs = w_rowsum.has_value() && w_rowsum->defined();
  TORCH_CHECK(!has_zp || has_rs, "qdsl_kernels.w8a8_linear: x_zp needs w_rowsum");
  if (has_rs) {
    check(*w_rowsum, at::kInt, 1, "w_rowsum");
    TORCH_CHECK(w_rowsum->size(0) == N, "qdsl_kernels.w8a8_linear: w_rowsum shape mismatch");
  }
  const bool has_b = bias.has_value() && bias->defined();
  if (has_b) {
    check(*bias, at::kFloat, 1, "bias");
    TORCH_CHECK(bias->size(0) == N, "qdsl_kernels.w8a8_linear: bias shape mismatch");
  }
  return {w.data_ptr<int8_t>(), w_scale.data_ptr<float>(),
          has_rs ? w_rowsum->data_ptr<int32_t>() : nullptr,
          has_b ? bias->data_ptr<float>() : nullptr, N, off};
}

const int32_t* w8a8_zp(const at::Tensor& xq, const at::Tensor& x_scale,
                       const c10::optional<at::Tensor>& x_zp) {
  check(xq, at::kChar, 2, "xq"); check(x_scale, at::kFloat, 1, "x_scale");
  TORCH_CHECK(x_scale.size(0) == xq.size(0), "qdsl_kernels.w8a8_linear: shape mismatch");
  if (!(x_zp.has_value() && x_zp->defined())) return nullptr;
  check(*x_zp, at::kInt, 1, "x_zp");
  TORCH_CHECK(x_zp->size(0) == xq.size(0), "qdsl_kernels.w8a8_linear: x_zp shape mismatch");
  return x_zp->data_ptr<int32_t>();
}

at::Tensor w8a8_linear(const at::Tensor& xq, const at::Tensor& x_scale,
                       const c10::optional<at::Tensor>& x_zp, const at::Tensor& w,
                       const at::Tensor& w_scale, const c10::optional<at::Tensor>& w_rowsum,
                       const c10::optional<at::Tensor>& bias, int64_t isa) {
  const int32_t* zp = w8a8_zp(xq, x_scale, x_zp);
  const std::vector<W8a8Seg> segs{
      w8a8_seg(w, w_scale, w_rowsum, bias, xq.size(1), zp != nullptr, 0)};
  return w8a8_run(xq, x_scale, zp, segs, segs[0].n, isa);
}

// several weights on one input (a layer's q / k / v, or gate / up): their outputs side by
// side in one call, [M, sum of N]
at::Tensor w8a8_linear_cat(const at::Tensor& xq, const at::Tensor& x_scale,
                           const c10::optional<at::Tensor>& x_zp, at::TensorList w,
                           at::TensorList w_scale,
                           const c10::List<c10::optional<at::Tensor>>& w_rowsum,
                           const c10::List<c10::optional<at::Tensor>>& bias, int64_t isa) {
  TORCH_CHECK(!w.empty() && w_scale.size() == w.size() && w_rowsum.size() == w.size() &&
              bias.size() == w.size(), "qdsl_kernels.w8a8_linear_cat: one scale, row sum "
              "and bias (or None) per weight");
  const int32_t* zp = w8a8_zp(xq, x_scale, x_zp);
  std::vector<W8a8Seg> segs;
  int64_t off = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    segs.push_back(w8a8_seg(w[i], w_scale[i], w_rowsum.get(i), bias.get(i), xq.size(1),
                            zp != nullptr, off));
    off += segs.back().n;
  }
  return w8a8_run(xq, x_scale, zp, segs, off, isa);
}

at::Tensor w4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                     int64_t gs, const c10::optional<at::Tensor>& bias, int64_t isa) {
  check(x, at::kFloat, 2, "x"); check(packed, at::kByte, 2, "packed"); check(scale, at::kFloat, 2, "scale");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  TORCH_CHECK(K % gs == 0 && gs % 32 == 0 && packed.size(1) == K / 2 && scale.size(0) == N &&
              scale.size(1) == K / gs, "qdsl_kernels.w4_linear: shape mismatch");
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>(); const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>(); float* yp = y.data_ptr<float>();
  const bool gemm = M >= W4_GEMM_MIN_M && isa >= ISA_AVX2;
  const auto rows = gemm ? pick_isa(isa, w4_rows_generic, w4_gemm_avx2, w4_gemm_avx512)
                         : pick_isa(isa, w4_rows_generic, w4_rows_avx2, w4_rows_avx512);
  at::parallel_for(0, N, gemm ? W4_PANEL : grain(K / 2), [&](int64_t n0, int64_t n1) {
    rows(xp, M, pp, sp, K, gs, n0, n1, yp, N);
  });
  epilogue_bias(y, bias);
  return y;
}

// ---------------------------------------------------------------- decode attention

// exp(x) for 8 floats (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial
// in r, times 2^n; ~1 ulp over the range softmax uses, exp(-inf) = 0)
__attribute__((target("avx2,fma")))
static inline __m256 exp256(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-88.3762626647949f);
  const __m256 zero_below = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(zero_below, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// The rest of a softmax over scores si[0, npad) (npad a multiple of 8, the padding -inf)
// whose max is mx: si <- exp(si - mx), then divided by their sum; or, for one chunk of a
// split over the keys (mx_out / sum_out non-null), left unnormalized with mx and the sum
// written out for the merge (a chunk masked out entirely: mx -inf, sum 0).
__attribute__((target("avx2,fma")))
static inline void softmax_tail(float* si, int64_t npad, float mx, float* mx_out,
                                float* sum_out) {
  const __m256 mv = _mm256_set1_ps(mx_out && mx == -INFINITY ? 0.f : mx);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t j = 0; j < npad; j += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(si + j), mv));
    _mm256_storeu_ps(si + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  if (mx_out) {
    *mx_out = mx;
    *sum_out = hsum256(acc);
    return;
  }
  const __m256 inv = _mm256_set1_ps(1.f / hsum256(acc));
  for (int64_t j = 0; j < npad; j += 8) _mm256_storeu_ps(si + j, _mm256_mul_ps(_mm256_loadu_ps(si + j), inv));
}

// The cache's element type T: float, or at::Half / at::BFloat16 (half the bytes, and a
// decode step's attention waits on reading them), widened to float32 as each row is
// loaded. The widening is exact (every f16 and bf16 value is a float32), so a 16-bit cache
// gives the float32 path's result on the same rounded values; the float overloads are the
// plain loads, so a float32 cache runs the code it ran before. The AVX2 path assumes F16C
// (vcvtph2ps): every AVX2 CPU in practice has it (Intel since Ivy Bridge, AMD since
// Piledriver). bf16 is the upper half of a float32: a zero-extend and a shift, no
// AVX512-BF16 needed.
__attribute__((target("avx2")))
static inline __m256 load8_ps(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,f16c")))
static inline __m256 load8_ps(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
__attribute__((target("avx2")))
static inline __m256 load8_ps(const at::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
__attribute__((target("avx512f,avx512bw,avx512vl")))
static inline __m512 load16_ps(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f,avx512bw,avx512vl")))
static inline __m512 load16_ps(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
__attribute__((target("avx512f,avx512bw,avx512vl")))
static inline __m512 load16_ps(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// The keys and values of a decode step come from memory, not cache (a step reads every
// layer's cache once): the AVX-512 path prefetches them kPrefetchRows rows ahead, which
// the hardware prefetchers alone did not keep up with (SmolLM2's layer at 560 keys,
// caches cold: 79.5 us on the AVX2 path, 1 thread). A prefetch fetches a 64-byte line:
// one per line, however many elements of T that holds.
constexpr int64_t kPrefetchRows = 16;

// out[d0, d0 + 8 R) = sum_j si[j] v[j, d0, d0 + 8 R) over j in [0, n): R registers of
// one head's output, each key's weight broadcast once (the sums in key order)
// (prefetch: the first pass over v, which fetches each row's lines kPrefetchRows ahead)
template <int R, typename T>
__attribute__((target("avx2,fma,f16c")))
static inline void attend_values_avx2(const T* v, int64_t n, int64_t D, int64_t d0,
                                      const float* si, float* out, bool prefetch) {
  constexpr int64_t line = 64 / sizeof(T);
  __m256 o[R];
  for (int r = 0; r < R; ++r) o[r] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const __m256 w = _mm256_set1_ps(si[j]);
    const T* vj = v + j * D + d0;
    if (prefetch && j + kPrefetchRows < n)
      for (int64_t l = 0; l < D; l += line)
        _mm_prefetch(reinterpret_cast<const char*>(v + (j + kPrefetchRows) * D + l), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) o[r] = _mm256_fmadd_ps(w, load8_ps(vj + 8 * r), o[r]);
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + d0 + 8 * r, o[r]);
}

// One query token against n cached keys for one key/value head and the g query heads
// sharing it (GQA): scores four keys at a time (one reduction per four dot products),
// a softmax (max-subtracted, vectorized exp), then per head v read once into up to 64
// output columns held in registers (an output chunk loaded and stored every eight keys,
// as before, made the step wait on store-to-load forwarding: SmolLM2's layer at 528
// keys, in cache, 35 -> 30 us, paired). D % 8 == 0 (checked by the caller). k and v point at T
// (the one signature, AttendFn, for every cache type).
//
// partial (mx, sum non-null: one chunk of a split over the keys): out is left
// unnormalized, sum_j exp(s_j - mx_i) v_j, with mx[i] and sum[i] for the merge; a chunk
// masked out entirely gives mx = -inf, sum = 0, out = 0
template <typename T>
__attribute__((target("avx2,fma,f16c")))
void attend_one_avx2(const float* q, const void* k_, const void* v_, const float* mask,
                     int64_t mask_h_stride, int64_t n, int64_t g, int64_t D, float scale,
                     float* s /*[g, n + 8] scratch*/, float* out /*[g, D]*/,
                     float* part_mx = nullptr, float* part_sum = nullptr) {
  const T* k = static_cast<const T*>(k_);
  const T* v = static_cast<const T*>(v_);
  const int64_t ld = n + 8;
  for (int64_t i = 0; i < g; ++i) {
    const float* qi = q + i * D;
    float* si = s + i * ld;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      const T* kj = k + j * D;
      if (i == 0 && j + kPrefetchRows + 4 <= n)
        for (int64_t l = 0; l < 4 * D; l += 64 / int64_t(sizeof(T)))
          _mm_prefetch(reinterpret_cast<const char*>(kj + kPrefetchRows * D + l), _MM_HINT_T0);
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(qi + d);
        a0 = _mm256_fmadd_ps(qv, load8_ps(kj + d), a0);
        a1 = _mm256_fmadd_ps(qv, load8_ps(kj + D + d), a1);
        a2 = _mm256_fmadd_ps(qv, load8_ps(kj + 2 * D + d), a2);
        a3 = _mm256_fmadd_ps(qv, load8_ps(kj + 3 * D + d), a3);
      }
      _mm_storeu_ps(si + j, reduce4_ps_256(a0, a1, a2, a3));
    }
    for (; j < n; ++j) {
      __m256 a = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8)
        a = _mm256_fmadd_ps(_mm256_loadu_ps(qi + d), load8_ps(k + j * D + d), a);
      si[j] = hsum256(a);
    }
    // softmax over si[0, n): scale, mask, max, exp, normalize; padded to a multiple of 8.
    // Eight scores a step (a scalar loop waited on its max chain: a sixth of this path's
    // time); one fused multiply-add per score, as in the scalar tail (and the loop before)
    const float* mi = mask ? mask + i * mask_h_stride : nullptr;
    const __m256 sc8 = _mm256_set1_ps(scale);
    __m256 mx8 = _mm256_set1_ps(-INFINITY);
    for (j = 0; j + 8 <= n; j += 8) {
      const __m256 x = _mm256_fmadd_ps(_mm256_loadu_ps(si + j), sc8,
                                       mi ? _mm256_loadu_ps(mi + j) : _mm256_setzero_ps());
      _mm256_storeu_ps(si + j, x);
      mx8 = _mm256_max_ps(mx8, x);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, mx8);
    float mx = *std::max_element(lanes, lanes + 8);
    for (; j < n; ++j) {
      si[j] = std::fma(si[j], scale, mi ? mi[j] : 0.f);
      mx = std::max(mx, si[j]);
    }
    const int64_t n8 = (n + 7) & ~int64_t(7);
    for (j = n; j < n8; ++j) si[j] = -INFINITY;
    softmax_tail(si, n8, mx, part_mx ? part_mx + i : nullptr, part_sum ? part_sum + i : nullptr);
  }
  // out[i] = sum_j s[i, j] v[j]: per head, a chunk of up to 64 of its output columns in
  // registers over all n keys (v from L1 / L2 after the first head)
  for (int64_t i = 0; i < g; ++i) {
    int64_t d = 0;
    for (; d + 64 <= D; d += 64)
      attend_values_avx2<8, T>(v, n, D, d, s + i * ld, out + i * D, i == 0 && d == 0);
    for (; d + 32 <= D; d += 32)
      attend_values_avx2<4, T>(v, n, D, d, s + i * ld, out + i * D, i == 0 && d == 0);
    for (; d < D; d += 8)
      attend_values_avx2<1, T>(v, n, D, d, s + i * ld, out + i * D, i == 0 && d == 0);
  }
}

// The same for AVX-512 and a head size of 16 * DV (DV 4: D = 64, DV 8: D = 128), with
// each key and value row loaded (and widened from T) once for all g query heads sharing
// it, not once per head: on a CPU that runs 512-bit operations in two halves (AMD Zen 4)
// the widening loads and FMAs, not memory, bounded the step (SmolLM2's layer at 528 keys
// took 32 us with its cache in L2 and 34 us cold, against ~14 us to read its 405 KB).
// Scores: KJ keys at a time (their rows in KJ * DV registers), one accumulator a key for
// each head, q read from L1. Values: per tile of up to GT heads, the output rows in
// GT * DV registers, each key's row loaded once into every head's accumulators (a tile
// count over 1 re-reads v from L1 / L2: Qwen2.5-Coder's 7 heads a key/value head are
// two tiles). Every dot product and every output sum adds in the order the one-head-at-a-
// time loops did, so the result is theirs bit for bit. The keys and values of a decode
// step come from memory, not cache (a step reads every layer's cache once): the score
// pass prefetches k, and the first tile's pass v (kPrefetchRows, above).

// out rows [i0, i0 + GT) += sum_j s[i, j] v[j] over j in [0, n) (out zeroed by the caller)
template <int DV, int GT, typename T>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void attend_values_avx512(const T* v, int64_t n, const float* s, int64_t ld, int64_t i0,
                          bool prefetch, float* out) {
  constexpr int64_t D = 16 * DV;
  constexpr int64_t line = 64 / sizeof(T);
  __m512 o[GT][DV];
  for (int i = 0; i < GT; ++i)
    for (int d = 0; d < DV; ++d) o[i][d] = _mm512_setzero_ps();
  const float* si = s + i0 * ld;
  for (int64_t j = 0; j < n; ++j) {
    const T* vj = v + j * D;
    if (prefetch && j + kPrefetchRows < n)
      for (int64_t l = 0; l < D; l += line)
        _mm_prefetch(reinterpret_cast<const char*>(vj + kPrefetchRows * D + l), _MM_HINT_T0);
    __m512 w[GT];
    for (int i = 0; i < GT; ++i) w[i] = _mm512_set1_ps(si[i * ld + j]);
    for (int d = 0; d < DV; ++d) {
      const __m512 x = load16_ps(vj + 16 * d);
      for (int i = 0; i < GT; ++i) o[i][d] = _mm512_fmadd_ps(w[i], x, o[i][d]);
    }
  }
  for (int i = 0; i < GT; ++i)
    for (int d = 0; d < DV; ++d) _mm512_storeu_ps(out + (i0 + i) * D + 16 * d, o[i][d]);
}

template <int DV, typename T>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void attend_one_avx512(const float* q, const void* k_, const void* v_, const float* mask,
                       int64_t mask_h_stride, int64_t n, int64_t g, int64_t /*D*/, float scale,
                       float* s /*[g, n + 16] scratch*/, float* out /*[g, D]*/,
                       float* part_mx = nullptr, float* part_sum = nullptr) {
  constexpr int64_t D = 16 * DV;
  constexpr int KJ = DV <= 4 ? 4 : 2;          // keys a step: KJ * DV registers of rows
  constexpr int GT = DV <= 4 ? 4 : 3;          // heads a value pass: GT * DV accumulators
  constexpr int64_t line = 64 / sizeof(T);
  const T* k = static_cast<const T*>(k_);
  const T* v = static_cast<const T*>(v_);
  const int64_t ld = n + 16;
  const int64_t n16 = (n + 15) & ~int64_t(15);
  // whole blocks of 4 keys as KJ-key steps, the rest one key at a time (the sums and
  // reductions of the 4-key loop this replaced, so the same scores bit for bit)
  const int64_t n4 = n & ~int64_t(3);
  int64_t j = 0;
  for (; j < n4; j += KJ) {
    const T* kj = k + j * D;
    if (j + kPrefetchRows + KJ <= n)
      for (int64_t l = 0; l < KJ * D; l += line)
        _mm_prefetch(reinterpret_cast<const char*>(kj + kPrefetchRows * D + l), _MM_HINT_T0);
    __m512 kr[KJ][DV];
    for (int t = 0; t < KJ; ++t)
      for (int d = 0; d < DV; ++d) kr[t][d] = load16_ps(kj + t * D + 16 * d);
    for (int64_t i = 0; i < g; ++i) {
      const float* qi = q + i * D;
      __m512 a[KJ];
      for (int t = 0; t < KJ; ++t) a[t] = _mm512_setzero_ps();
      for (int d = 0; d < DV; ++d) {
        const __m512 qv = _mm512_loadu_ps(qi + 16 * d);
        for (int t = 0; t < KJ; ++t) a[t] = _mm512_fmadd_ps(qv, kr[t][d], a[t]);
      }
      float* si = s + i * ld + j;
      if constexpr (KJ == 4) {
        _mm_storeu_ps(si, reduce4_ps(a[0], a[1], a[2], a[3]));
      } else {                   // the 4-key reduction's sums (its order), two of them kept
        _mm_storel_pi(reinterpret_cast<__m64*>(si), reduce4_ps(a[0], a[1], a[0], a[1]));
      }
    }
  }
  for (; j < n; ++j)
    for (int64_t i = 0; i < g; ++i) {
      __m512 a = _mm512_setzero_ps();
      for (int d = 0; d < DV; ++d)
        a = _mm512_fmadd_ps(_mm512_loadu_ps(q + i * D + 16 * d), load16_ps(k + j * D + 16 * d), a);
      s[i * ld + j] = _mm512_reduce_add_ps(a);
    }
  // softmax of each head's scores over [0, n): scale, mask, max, exp (AVX2 halves), normalize
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < g; ++i) {
    float* si = s + i * ld;
    const float* mi = mask ? mask + i * mask_h_stride : nullptr;
    for (j = n; j < n16; ++j) si[j] = -INFINITY;
    __m512 mxv = _mm512_set1_ps(-INFINITY);
    for (j = 0; j < n16; j += 16) {
      const __mmask16 live = j + 16 <= n ? __mmask16(0xffff) : __mmask16((1u << (n - j)) - 1);
      __m512 x = _mm512_mul_ps(_mm512_loadu_ps(si + j), sc);
      if (mi) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(live, mi + j));
      x = _mm512_mask_blend_ps(live, _mm512_set1_ps(-INFINITY), x);
      _mm512_storeu_ps(si + j, x);
      mxv = _mm512_max_ps(mxv, x);
    }
    softmax_tail(si, n16, _mm512_reduce_max_ps(mxv), part_mx ? part_mx + i : nullptr,
                 part_sum ? part_sum + i : nullptr);
  }
  // out[i] = sum_j s[i, j] v[j]: the heads in tiles of at most GT, as even as they split
  const int64_t tiles = (g + GT - 1) / GT, per = (g + tiles - 1) / tiles;
  for (int64_t i0 = 0; i0 < g; i0 += per) {
    const int64_t gt = std::min(per, g - i0);
    const bool first = i0 == 0;
    switch (gt) {
      case 1: attend_values_avx512<DV, 1, T>(v, n, s, ld, i0, first, out); break;
      case 2: attend_values_avx512<DV, 2, T>(v, n, s, ld, i0, first, out); break;
      case 3: attend_values_avx512<DV, 3, T>(v, n, s, ld, i0, first, out); break;
      default:
        if constexpr (GT >= 4) attend_values_avx512<DV, 4, T>(v, n, s, ld, i0, first, out);
    }
  }
}

using AttendFn = void (*)(const float*, const void*, const void*, const float*, int64_t,
                          int64_t, int64_t, int64_t, float, float*, float*, float*, float*);

// the path for this head size, `isa` and cache type: AVX-512 for D = 64 or 128, else AVX2
template <typename T>
AttendFn pick_attend(int64_t D, int64_t isa) {
  if (isa >= ISA_AVX512 && D == 64) return attend_one_avx512<4, T>;
  if (isa >= ISA_AVX512 && D == 128) return attend_one_avx512<8, T>;
  return attend_one_avx2<T>;
}

AttendFn pick_attend(int64_t D, int64_t isa, at::ScalarType dtype) {
  if (dtype == at::kHalf) return pick_attend<at::Half>(D, isa);
  if (dtype == at::kBFloat16) return pick_attend<at::BFloat16>(D, isa);
  return pick_attend<float>(D, isa);
}

constexpr int64_t kMinChunkKeys = 128;   // the fewest keys a thread's chunk gets

// the chunks of one (batch, key/value head) pair, each an unnormalized output with its
// softmax max and sum (attend_one_*'s part_mx / part_sum), merged into the g heads' rows
// out [g, D]: each chunk rescaled to the largest max (a chunk with no keys: max -inf)
void merge_chunks(const float* po, const float* pm, const float* ps, int64_t pair,
                  int64_t chunks, int64_t g, int64_t D, float* out) {
  for (int64_t i = 0; i < g; ++i) {
    float mx = -INFINITY;
    for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, pm[(pair * chunks + c) * g + i]);
    float* oi = out + i * D;
    std::fill(oi, oi + D, 0.f);
    float den = 0.f;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t t = pair * chunks + c;
      const float m = pm[t * g + i];
      const float w = m == -INFINITY ? 0.f : std::exp(m - mx);
      den += w * ps[t * g + i];
      const float* o = po + (t * g + i) * D;
      for (int64_t d = 0; d < D; ++d) oi[d] += w * o[d];
    }
    for (int64_t d = 0; d < D; ++d) oi[d] /= den;
  }
}

// q [B, H, 1, D]; k, v [B, Hk, >= n, D] (a cache: any strides on B and Hk, rows of D
// contiguous), both float32, both float16 or both bfloat16; mask: additive float
// [1 or B, 1 or H, 1, >= n], or none. -> float32 [B, H, 1, D]
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, int64_t n, double scale,
                            int64_t isa) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1 &&
              q.scalar_type() == at::kFloat, "qdsl_kernels.decode_attention: float32 4-d q "
              "[B, H, 1, D], k / v [B, Hk, L, D]");
  const at::ScalarType kv_type = k.scalar_type();
  TORCH_CHECK((kv_type == at::kFloat || kv_type == at::kHalf || kv_type == at::kBFloat16) &&
              v.scalar_type() == kv_type, "qdsl_kernels.decode_attention: k and v must both "
              "be float32, both float16 or both bfloat16 (got ", k.scalar_type(), " and ",
              v.scalar_type(), ")");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hk = k.size(1);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hk && k.size(3) == D &&
              v.size(3) == D && D % 8 == 0 && H % Hk == 0 && n >= 1 && n <= k.size(2) &&
              n <= v.size(2) && k.stride(3) == 1 && v.stride(3) == 1 && k.stride(2) == D &&
              v.stride(2) == D, "qdsl_kernels.decode_attention: shape mismatch");
  const at::Tensor qc = q.contiguous();
  at::Tensor mc;
  const float* mp = nullptr;
  int64_t mb = 0, mh = 0;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kFloat && mask->dim() == 4 && mask->size(2) == 1 &&
                mask->size(3) >= n && (mask->size(1) == 1 || mask->size(1) == H) &&
                (mask->size(0) == 1 || mask->size(0) == B),
                "qdsl_kernels.decode_attention: mask must be float [B, 1 or H, 1, >= n]");
    mc = mask->contiguous();
    mp = mc.data_ptr<float>();
    mb = mask->size(0) == 1 ? 0 : mc.stride(0);
    mh = mask->size(1) == 1 ? 0 : mc.stride(1);
  }
  const int64_t g = H / Hk;
  const AttendFn attend = pick_attend(D, isa, kv_type);
  at::Tensor out = at::empty({B, H, 1, D}, q.options());
  const float* qp = qc.data_ptr<float>(); float* op = out.data_ptr<float>();
  // k and v addressed in bytes (the attend paths take them untyped): strides times es
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  const int64_t es = k.element_size(), ks0 = k.stride(0) * es, ks1 = k.stride(1) * es,
                vs0 = v.stride(0) * es, vs1 = v.stride(1) * es;
  // fewer (b, hk) pairs than two per thread (SmolLM2: 3 key/value heads): split the keys
  // into chunks (flash-decoding) so that every thread gets work, then merge the chunks'
  // softmax statistics; one thread, or short caches, run each pair whole
  const int64_t threads = at::get_num_threads(), pairs = B * Hk;
  const int64_t chunks = threads > 1 && pairs < 2 * threads
      ? std::max<int64_t>(1, std::min<int64_t>((2 * threads + pairs - 1) / pairs, n / kMinChunkKeys))
      : 1;
  if (chunks == 1) {
    at::parallel_for(0, pairs, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> scratch(g * (n + 16));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / Hk, hk = t % Hk;
        attend(qp + (b * H + hk * g) * D, kp + b * ks0 + hk * ks1,
                        vp + b * vs0 + hk * vs1, mp ? mp + b * mb + hk * g * mh : nullptr, mh,
                        n, g, D, float(scale), scratch.data(), op + (b * H + hk * g) * D,
                        nullptr, nullptr);
      }
    });
    return out;
  }
  const int64_t step = (n + chunks - 1) / chunks;
  std::vector<float> po(pairs * chunks * g * D), pm(pairs * chunks * g), ps(pairs * chunks * g);
  at::parallel_for(0, pairs * chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scratch(g * (step + 16));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t pr = t / chunks, c = t % chunks, b = pr / Hk, hk = pr % Hk;
      const int64_t j0 = c * step, len = std::min(step, n - j0);
      float* o = po.data() + t * g * D;
      if (len <= 0) {            // no keys left for this chunk: contributes nothing
        std::fill(o, o + g * D, 0.f);
        std::fill(pm.data() + t * g, pm.data() + (t + 1) * g, -INFINITY);
        std::fill(ps.data() + t * g, ps.data() + (t + 1) * g, 0.f);
        continue;
      }
      attend(qp + (b * H + hk * g) * D, kp + b * ks0 + hk * ks1 + j0 * D * es,
                      vp + b * vs0 + hk * vs1 + j0 * D * es,
                      mp ? mp + b * mb + hk * g * mh + j0 : nullptr, mh, len, g, D,
                      float(scale), scratch.data(), o, pm.data() + t * g, ps.data() + t * g);
    }
  });
  for (int64_t pr = 0; pr < pairs; ++pr) {
    const int64_t b = pr / Hk, hk = pr % Hk;
    merge_chunks(po.data(), pm.data(), ps.data(), pr, chunks, g, D, op + (b * H + hk * g) * D);
  }
  return out;
}

at::Tensor cached_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const c10::optional<at::Tensor>& mask,
                                   const at::Tensor& cache_position, double scale,
                                   int64_t isa) {
  TORCH_CHECK(cache_position.scalar_type() == at::kLong && cache_position.dim() == 1 &&
              cache_position.numel() >= 1 && cache_position.device().is_cpu(),
              "qdsl_kernels.cached_decode_attention: cache_position must be int64 [T] on the CPU");
  const int64_t n = cache_position.data_ptr<int64_t>()[(cache_position.numel() - 1) *
                                                      cache_position.stride(0)] + 1;
  return decode_attention(q, k, v, mask, n, scale, isa);
}


// ---------------------------------------------------------------- llama_decode_step
//
// One decode step of a LLaMA-shaped model whose linears are all w8a8 or w4a8 with
// symmetric dynamic activations (recipes/int8/w8a8_dynamic*.qrec, w4a8_dynamic.qrec),
// batch 1, one token, in ONE
// OpenMP parallel region: the threads walk the whole layer list and meet at barriers
// (5 a layer), as llama.cpp's graph compute does, instead of one fork / join per op.
// Each thread keeps its own copy of the residual stream and computes the cheap per-token
// work (RMSNorm, the activations' 8-bit codes, SiLU x up, merging the attention chunks)
// redundantly; the GEMVs split their output rows, the attention its (key/value head, key
// chunk) pairs. qdsl/runtime/fused.py builds the argument lists from a lowered graph and
// checks the step's logits against the graph's before using it.
//
//   embed int8 [V, D] / embed_scale float32 [V], token: the token's embedding row (its codes
//   times its scale, as Int8Embedding; or packed 4-bit rows uint8 [V, D / 2] with group
//   scales [V, G], as a 4-bit PackedEmbedding);  norms: 2L + 1 float32 [D] (input,
//   post-attention per layer, then the final norm);  w / ws / bias: 7L + 1 weights (int8
//   [N, K] with float32 [N] scales, or packed 4-bit uint8 [N, K / 2] with float32 [N, G]
//   group scales: w4a8_linear's operands), optional float32 [N] biases (q, k, v, o, gate,
//   up, down per layer, then the head);  kc / vc: L caches [1, Hk, S, hd] (float32, float16 or bfloat16), the token's
//   keys and values written at `pos`;  inv_freq float32 [hd / 2], rope_scale: the rotary
//   embedding at `pos` (cos / sin of pos * inv_freq, twice, times rope_scale; rotate_half
//   convention, as transformers' LLaMA);  H query heads;  eps, scale.  -> logits float32 [V]

// a linear of the step: w8a8 (int8 w [N, K], its scale ws [N]) or 4-bit (p: packed codes
// [N, K / 2], two a byte, low nibble first, u - 8, as w4a8_linear and w4_linear take them;
// sc: their scales [N, K / gs]) times 8-bit dynamic activations (a8: w4a8) or the float
// input (w4 weight-only: w4_16_rows on its 16-bit codes)
struct DecodeLinear {
  const int8_t* w; const float* ws; const float* b; int64_t n, k;
  const uint8_t* p = nullptr; const float* sc = nullptr; int64_t gs = 0;
  bool a8 = true;
};

// w4a8 linears (qdsl_w4a8.cpp: cext.build compiles the sources as one translation unit)
struct W4a8Token;
W4a8Token* w4a8_token();
float w4a8_token_quantize(W4a8Token* t, const float* x, int64_t K, int64_t gs, int64_t isa);
void w4a8_token_rows(const W4a8Token* t, const uint8_t* p, const float* sc, const float* bias,
                     int64_t n0, int64_t n1, float* y);

inline DecodeLinear decode_linear(const at::Tensor& w, const at::Tensor& ws,
                                  const c10::optional<at::Tensor>& b, int64_t a_bits) {
  const char* op = "llama_decode_step";
  const bool w4 = w.scalar_type() == at::kByte;
  check_tensor(w, w4 ? at::kByte : at::kChar, 2, op, "w");
  check_tensor(ws, at::kFloat, w4 ? 2 : 1, op, "w_scale");
  const int64_t n = w.size(0), k = w4 ? 2 * w.size(1) : w.size(1);
  TORCH_CHECK(ws.size(0) == n, op, ": a weight's scale is not [N] (int8) or [N, G] (4-bit)");
  TORCH_CHECK(!w4 || (ws.size(1) > 0 && k % ws.size(1) == 0 && (k / ws.size(1)) % 2 == 0),
              op, ": a 4-bit weight's ", ws.size(1), " groups do not split its ", k, " columns");
  const float* bp = nullptr;
  if (b.has_value() && b->defined()) {
    check_tensor(*b, at::kFloat, 1, op, "bias");
    TORCH_CHECK(b->size(0) == n, op, ": a bias is not [N]");
    bp = b->data_ptr<float>();
  }
  DecodeLinear l{w4 ? nullptr : w.data_ptr<int8_t>(), w4 ? nullptr : ws.data_ptr<float>(), bp,
                 n, k};
  TORCH_CHECK(a_bits == 8 || a_bits == 32, op, ": a linear's activations are 8-bit codes "
              "(8) or float (32), not ", a_bits);
  TORCH_CHECK(a_bits == 8 || w4, op, ": a float-input linear must have 4-bit weights");
  if (w4) {
    l.p = w.data_ptr<uint8_t>();
    l.sc = ws.data_ptr<float>();
    l.gs = k / ws.size(1);
    l.a8 = a_bits == 8;
    TORCH_CHECK(l.a8 || l.gs % 32 == 0, op, ": a w4 weight-only linear's groups of ", l.gs,
                " columns are not a multiple of 32 (w4_linear's kernels)");
  }
  return l;
}

// this thread's share [a, b) of N output rows (blocks of 16 rows)
inline void row_share(int64_t N, int tid, int T, int64_t* a, int64_t* b) {
  const int64_t blocks = (N + 15) / 16, per = (blocks + T - 1) / T;
  *a = std::min(N, tid * per * 16);
  *b = std::min(N, (tid + 1) * per * 16);
}

float decode_quantize(const float* x, int64_t K, int64_t isa, int8_t* xq, void* xv);

// One input of the step's linears, quantized by this thread on first use: the 8-bit
// codes a w8a8 GEMV takes (decode_quantize: xq / xv) and, separately, w4a8's layout of
// the same codes for a group size (W4a8Token)
struct DecodeIn {
  const float* x; int64_t K, isa;
  int8_t* xq; void* xv;
  W4a8Token* w4;
  int16_t* x16; float* x16s;  // x as w4_token16's codes and group scales (w4 weight-only)
  bool w8 = false; float w8s = 0.f;
  int64_t w4gs = -1, x16gs = -1;
};

// out[off + n] for this thread's rows of the linears `ls` (on one input, outputs side by
// side). The w8a8 row kernel: VNNI's (u8 codes, the row sums from the same pass) on
// VNNI; on AVX2 and AVX-512 without VNNI w8a8_row1_avx2_s8 (int8 codes, no widening).
// Paired in one process on SmolLM2-135M's fused step (1 thread, 512 keys), the int8-code
// kernel against the int16 paths it replaced: 0.870x [0.857, 0.883] of the step forced
// to AVX2, 0.785x [0.768, 0.803] with oneDNN capped below VNNI; on VNNI 1.002x at 1
// thread and 1.041x at 2 (so VNNI keeps its own); docs/performance.md, session 41.
// w4a8 linears: w4a8_linear's kernels for this thread's rows; w4 weight-only ones:
// w4_16_rows on AVX2 and up (x rounded to 16-bit codes once per group size), the float
// generic kernel below AVX2.
void decode_gemv(const DecodeLinear* ls, int count, DecodeIn& in, int tid, int T,
                 int32_t* acc, int32_t* rs, float* out) {
  int64_t N = 0;
  for (int i = 0; i < count; ++i) N += ls[i].n;
  int64_t a, b;
  row_share(N, tid, T, &a, &b);
  const int64_t isa = in.isa;
  const bool vnni = isa >= ISA_VNNI;
  int64_t off = 0;
  for (int i = 0; i < count; ++i) {
    const DecodeLinear& l = ls[i];
    const int64_t r0 = std::max(a, off) - off, r1 = std::min(b, off + l.n) - off;
    if (r0 < r1 && l.p && !l.a8) {
      if (isa >= ISA_AVX2) {                  // l.gs % 32 == 0: decode_linear checks it
        if (in.x16gs != l.gs) {
          w4_token16(in.x, in.K, l.gs, in.x16, in.x16s);
          in.x16gs = l.gs;
        }
        w4_16_rows(isa >= ISA_VNNI, in.x16, in.x16s, l.p, l.sc, l.k, l.gs, r0, r1, out + off);
      } else {
        w4_rows_generic(in.x, 1, l.p, l.sc, l.k, l.gs, r0, r1, out + off, 0);
      }
      if (l.b)
        for (int64_t r = r0; r < r1; ++r) out[off + r] += l.b[r];
    } else if (r0 < r1 && l.p) {
      if (in.w4gs != l.gs) {
        w4a8_token_quantize(in.w4, in.x, in.K, l.gs, isa);
        in.w4gs = l.gs;
      }
      w4a8_token_rows(in.w4, l.p, l.sc, l.b, r0, r1, out + off);
    } else if (r0 < r1) {
      if (!in.w8) {
        in.w8s = decode_quantize(in.x, in.K, isa, in.xq, in.xv);
        in.w8 = true;
      }
      if (vnni)
        w8a8_rows_vnni(static_cast<const uint8_t*>(in.xv), 1, l.w, l.k, r0, r1, acc + off, N,
                       rs + off);
      else if (isa >= ISA_AVX2)
        w8a8_row1_avx2_s8(static_cast<const int8_t*>(in.xv), l.w, l.k, r0, r1, acc + off);
      else
        w8a8_rows_generic(static_cast<const int16_t*>(in.xv), 1, l.w, l.k, r0, r1, acc + off, N);
      w8a8_epilogue(acc + off, 1, N, r0, r1, &in.w8s, nullptr, vnni ? 128 : 0,
                    vnni ? rs + off : nullptr, l.ws, l.b, out + off);
    }
    off += l.n;
  }
}

// x [K] -> its symmetric per-token 8-bit codes as the GEMV takes them (u8 x + 128 on VNNI,
// int8 on AVX2 / AVX-512, int16 on the generic path) and the scale: quantize_rows' maths
// (the fake-quant's own), 8 lanes at a time on AVX2 (vroundps to nearest even =
// nearbyint's default rounding): the same codes, in [-127, 127] (w8a8_row1_avx2_s8
// relies on it)
__attribute__((target("avx2,fma")))
float decode_quantize_avx2(const float* x, int64_t K, bool vnni, void* xv) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 mx = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
  alignas(32) float t[8];
  _mm256_store_ps(t, mx);
  float amax = 0.f;
  for (float v : t) amax = std::max(amax, v);
  for (int64_t i = k; i < K; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float s = sym_scale8(amax), inv = 1.f / s;
  const __m256 vinv = _mm256_set1_ps(inv), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  const __m256i off = _mm256_set1_epi32(vnni ? 128 : 0);
  for (k = 0; k + 8 <= K; k += 8) {
    __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
    const __m256i q = _mm256_add_epi32(_mm256_cvtps_epi32(v), off);
    const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(static_cast<int8_t*>(xv) + k),
                     vnni ? _mm_packus_epi16(q16, q16) : _mm_packs_epi16(q16, q16));
  }
  for (; k < K; ++k) {
    const float q = std::min(std::max(std::nearbyint(x[k] * inv), -127.f), 127.f);
    if (vnni) static_cast<uint8_t*>(xv)[k] = uint8_t(int(q) + 128);
    else static_cast<int8_t*>(xv)[k] = int8_t(q);
  }
  return s;
}

// the same on any CPU (generic path: quantize_rows itself, int16 codes)
float decode_quantize(const float* x, int64_t K, int64_t isa, int8_t* xq, void* xv) {
  if (isa >= ISA_AVX2) return decode_quantize_avx2(x, K, isa >= ISA_VNNI, xv);
  float s;
  quantize_rows<int8_t>(x, 1, K, true, true, xq, &s);
  int16_t* d = static_cast<int16_t*>(xv);
  for (int64_t i = 0; i < K; ++i) d[i] = xq[i];
  return s;
}

__attribute__((target("avx2,fma")))
float sumsq_avx2(const float* x, int64_t D) {
  __m256 a = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= D; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    a = _mm256_fmadd_ps(v, v, a);
  }
  float ss = hsum256(a);
  for (; i < D; ++i) ss += x[i] * x[i];
  return ss;
}

// y = x * rsqrt(mean(x^2) + eps) * w (the graph's RMSNorm, float32)
void decode_rmsnorm(const float* x, const float* w, int64_t D, float eps, int64_t isa, float* y) {
  float ss = 0.f;
  if (isa >= ISA_AVX2) ss = sumsq_avx2(x, D);
  else for (int64_t i = 0; i < D; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / float(D) + eps);
  for (int64_t i = 0; i < D; ++i) y[i] = w[i] * (x[i] * r);
}

// x[i] = silu(g[i]) * u[i] (exp256: ~1 ulp)
__attribute__((target("avx2,fma")))
void silu_mul_avx2(const float* g, const float* u, int64_t n, float* x) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 e = exp256(_mm256_xor_ps(gv, sign));
    _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)),
                                          _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) x[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

// x [hd] rotated in place: x * cos + rotate_half(x) * sin
void decode_rope(float* x, const float* c, const float* s, int64_t hd) {
  const int64_t h = hd / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * c[i] - b * s[i];
    x[i + h] = b * c[i + h] + a * s[i + h];
  }
}

template <typename T>
void store_row(const float* x, int64_t n, void* dst) {
  T* d = static_cast<T*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = T(x[i]);
}

at::Tensor llama_decode_step(const at::Tensor& embed, const at::Tensor& embed_scale,
                             int64_t token, at::TensorList norms, at::TensorList w,
                             at::TensorList ws, const c10::List<c10::optional<at::Tensor>>& bias,
                             at::TensorList kc, at::TensorList vc, const at::Tensor& inv_freq,
                             double rope_scale, int64_t pos, int64_t H, double eps,
                             double scale, int64_t isa, at::IntArrayRef a_bits) {
  const char* op = "llama_decode_step";
  // the embedding: int8 rows [V, D] with a scale a row, or packed 4-bit rows [V, D / 2]
  // (two codes a byte, low nibble first, u - 8) with their group scales [V, G]
  const bool e4 = embed.scalar_type() == at::kByte;
  check_tensor(embed, e4 ? at::kByte : at::kChar, 2, op, "embed");
  check_tensor(embed_scale, at::kFloat, e4 ? 2 : 1, op, "embed_scale");
  check_tensor(inv_freq, at::kFloat, 1, op, "inv_freq");
  TORCH_CHECK(embed_scale.size(0) == embed.size(0) && token >= 0 && token < embed.size(0), op,
              ": token ", token, " outside the embedding's ", embed.size(0), " rows");
  const int64_t L = kc.size(), D = e4 ? 2 * embed.size(1) : embed.size(1);
  TORCH_CHECK(!e4 || (embed_scale.size(1) > 0 && D % embed_scale.size(1) == 0), op,
              ": the 4-bit embedding's ", embed_scale.size(1), " groups do not split ", D);
  TORCH_CHECK(L >= 1 && vc.size() == size_t(L) && norms.size() == size_t(2 * L + 1) &&
              w.size() == size_t(7 * L + 1) && ws.size() == w.size() && bias.size() == w.size(),
              op, ": expected L caches, 2L + 1 norms and 7L + 1 weights, scales and biases");
  const at::ScalarType ct = kc[0].scalar_type();
  TORCH_CHECK(ct == at::kFloat || ct == at::kHalf || ct == at::kBFloat16, op,
              ": caches must be float32, float16 or bfloat16");
  const int64_t Hk = kc[0].size(1), S = kc[0].size(2), hd = kc[0].size(3);
  TORCH_CHECK(H % Hk == 0 && hd % 8 == 0 && inv_freq.size(0) * 2 == hd && pos >= 0 &&
              pos < S, op, ": shape mismatch (heads, head size, rotary frequencies or "
              "position)");
  for (int64_t l = 0; l < L; ++l)
    for (const at::Tensor* c : {&kc[l], &vc[l]})
      TORCH_CHECK(c->is_contiguous() && c->dim() == 4 && c->size(0) == 1 &&
                  c->size(1) == Hk && c->size(2) == S && c->size(3) == hd &&
                  c->scalar_type() == ct, op, ": every cache must be a contiguous [1, Hk, S, hd] "
                  "tensor of one dtype");
  for (const at::Tensor& nw : norms) {
    check_tensor(nw, at::kFloat, 1, op, "norm weight");
    TORCH_CHECK(nw.size(0) == D, op, ": a norm weight is not [D]");
  }
  TORCH_CHECK(a_bits.empty() || a_bits.size() == w.size(), op,
              ": a_bits names one activation width per weight (or none: all 8)");
  std::vector<DecodeLinear> lin;
  for (size_t i = 0; i < w.size(); ++i)
    lin.push_back(decode_linear(w[i], ws[i], bias.get(i), a_bits.empty() ? 8 : a_bits[i]));
  int64_t I = 0, maxn = 0, maxk = D;
  for (int64_t l = 0; l < L; ++l) {
    const DecodeLinear* q = &lin[7 * l];
    TORCH_CHECK(q[0].k == D && q[1].k == D && q[2].k == D && q[0].n == H * hd &&
                q[1].n == Hk * hd && q[2].n == Hk * hd && q[3].k == H * hd && q[3].n == D &&
                q[4].k == D && q[5].k == D && q[4].n == q[5].n && q[6].k == q[4].n &&
                q[6].n == D, op, ": layer ", l, "'s weights do not chain");
    I = std::max(I, q[4].n);
  }
  TORCH_CHECK(lin.back().k == D, op, ": the head's input is not [D]");
  for (const DecodeLinear& l : lin) { maxn = std::max(maxn, l.n); maxk = std::max(maxk, l.k); }
  maxn = std::max(maxn, H * hd + 2 * Hk * hd);
  maxn = std::max(maxn, 2 * I);
  const int64_t V = lin.back().n, g = H / Hk, n = pos + 1, es = kc[0].element_size();
  const int64_t T = std::max<int64_t>(1, at::get_num_threads());
  // attention work: (key/value head, key chunk) items, as decode_attention splits them
  const int64_t chunks = T > 1 && Hk < 2 * T
      ? std::max<int64_t>(1, std::min<int64_t>((2 * T + Hk - 1) / Hk, n / kMinChunkKeys)) : 1;
  const int64_t step = (n + chunks - 1) / chunks, items = Hk * chunks;
  const int64_t last = (n - 1) / step;     // the chunk holding `pos`: it writes the new row
  const AttendFn attend = pick_attend(hd, isa, ct);

  at::Tensor logits = at::empty({V}, embed_scale.options());
  // the calling thread's buffers, kept between steps (no allocation or zeroing a step);
  // two output buffers, alternating (A: q k v, gate up; B: o, down), so that no thread
  // writes one while another still reads it: 5 barriers a layer
  static thread_local std::vector<int32_t> acc, rs;
  static thread_local std::vector<float> buf_a, buf_b, po, pm, psum;
  auto grow = [](auto& v, int64_t n) { if (int64_t(v.size()) < n) v.resize(n); };
  grow(acc, maxn); grow(rs, maxn); grow(buf_a, maxn); grow(buf_b, D);
  grow(po, items * g * hd); grow(pm, items * g); grow(psum, items * g);
  // (pointers: inside the parallel region these names would be each thread's own)
  float* yo = buf_a.data();
  float* yb = buf_b.data();
  int32_t* accp = acc.data();
  int32_t* rsp = rs.data();
  float* pop = po.data();
  float* pmp = pm.data();
  float* psp = psum.data();
  float* lp = logits.data_ptr<float>();
  // the token's embedding and rotary tables (the graph's float32 operations; cos / sin
  // are libm's, within an ulp of torch's)
  std::vector<float> h0(D), cs(2 * hd);
  {
    if (e4) {
      const uint8_t* er = embed.data_ptr<uint8_t>() + token * (D / 2);
      const int64_t G = embed_scale.size(1), egs = D / G;
      const float* es0 = embed_scale.data_ptr<float>() + token * G;
      for (int64_t i = 0; i < D; ++i) {
        const uint8_t byte = er[i / 2];
        h0[i] = float(int((i & 1) ? (byte >> 4) : (byte & 15)) - 8) * es0[i / egs];
      }
    } else {
      const int8_t* er = embed.data_ptr<int8_t>() + token * D;
      const float es0 = embed_scale.data_ptr<float>()[token];
      for (int64_t i = 0; i < D; ++i) h0[i] = float(er[i]) * es0;
    }
    const float* f = inv_freq.data_ptr<float>();
    const float rs = float(rope_scale);
    for (int64_t i = 0; i < hd; ++i) {
      const float a = float(pos) * f[i % (hd / 2)];
      cs[i] = std::cos(a) * rs;
      cs[hd + i] = std::sin(a) * rs;
    }
  }
  const float* c = cs.data();
  const float* sn = cs.data() + hd;
  const float fe = float(eps), fs = float(scale);

#pragma omp parallel num_threads(T)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    // each thread's own (kept between steps): the residual stream and the per-token work
    static thread_local std::vector<float> h, x, qh, kv, sc, x16s;
    static thread_local std::vector<int8_t> xq;
    static thread_local std::vector<int16_t> x16;
    static thread_local std::vector<int16_t> xv;   // int16 codes, or int8 / u8 in its bytes
    grow(h, D); grow(x, std::max(maxk, H * hd)); grow(qh, g * hd); grow(kv, 2 * hd);
    grow(sc, g * (step + 16)); grow(xq, maxk); grow(xv, maxk);
    grow(x16, maxk); grow(x16s, maxk / 32 + 1);
    std::copy(h0.begin(), h0.end(), h.data());
    W4a8Token* w4t = w4a8_token();
    auto input = [&](int64_t K) {      // x [K] as the next decode_gemv's input
      return DecodeIn{x.data(), K, isa, xq.data(), xv.data(), w4t, x16.data(), x16s.data()};
    };
    for (int64_t l = 0; l < L; ++l) {
      const DecodeLinear* ql = &lin[7 * l];
      char* kp = static_cast<char*>(kc[l].data_ptr());
      char* vp = static_cast<char*>(vc[l].data_ptr());
      // q, k, v
      decode_rmsnorm(h.data(), norms[2 * l].data_ptr<float>(), D, fe, isa, x.data());
      {
        DecodeIn in = input(D);
        decode_gemv(ql, 3, in, tid, nt, accp, rsp, yo);
      }
#pragma omp barrier
      // attention: each item's query heads rotated privately; the item holding `pos`
      // writes the token's key and value rows first (no other item reads that row)
      for (int64_t t = tid; t < items; t += nt) {
        const int64_t hk = t / chunks, ch = t % chunks, j0 = ch * step;
        const int64_t len = std::min(step, n - j0);
        float* o = pop + t * g * hd;
        if (len <= 0) {
          std::fill(o, o + g * hd, 0.f);
          std::fill(pmp + t * g, pmp + (t + 1) * g, -INFINITY);
          std::fill(psp + t * g, psp + (t + 1) * g, 0.f);
          continue;
        }
        char* kh = kp + hk * S * hd * es;
        char* vh = vp + hk * S * hd * es;
        if (ch == last) {
          std::copy(yo + H * hd + hk * hd, yo + H * hd + (hk + 1) * hd, kv.data());
          std::copy(yo + (H + Hk) * hd + hk * hd, yo + (H + Hk) * hd + (hk + 1) * hd,
                    kv.data() + hd);
          decode_rope(kv.data(), c, sn, hd);
          void* kd = kh + pos * hd * es;
          void* vd = vh + pos * hd * es;
          if (ct == at::kFloat) { store_row<float>(kv.data(), hd, kd); store_row<float>(kv.data() + hd, hd, vd); }
          else if (ct == at::kHalf) { store_row<at::Half>(kv.data(), hd, kd); store_row<at::Half>(kv.data() + hd, hd, vd); }
          else { store_row<at::BFloat16>(kv.data(), hd, kd); store_row<at::BFloat16>(kv.data() + hd, hd, vd); }
        }
        for (int64_t i = 0; i < g; ++i) {
          std::copy(yo + (hk * g + i) * hd, yo + (hk * g + i + 1) * hd, qh.data() + i * hd);
          decode_rope(qh.data() + i * hd, c, sn, hd);
        }
        attend(qh.data(), kh + j0 * hd * es, vh + j0 * hd * es, nullptr, 0, len, g, hd, fs,
               sc.data(), o, pmp + t * g, psp + t * g);
      }
#pragma omp barrier
      // merge the chunks (every thread, privately) -> o_proj's input
      for (int64_t hk = 0; hk < Hk; ++hk)
        merge_chunks(pop, pmp, psp, hk, chunks, g, hd, x.data() + hk * g * hd);
      {
        DecodeIn in = input(H * hd);
        decode_gemv(ql + 3, 1, in, tid, nt, accp, rsp, yb);
      }
#pragma omp barrier
      for (int64_t i = 0; i < D; ++i) h[i] += yb[i];
      // gate, up
      decode_rmsnorm(h.data(), norms[2 * l + 1].data_ptr<float>(), D, fe, isa, x.data());
      {
        DecodeIn in = input(D);
        decode_gemv(ql + 4, 2, in, tid, nt, accp, rsp, yo);
      }
#pragma omp barrier
      const int64_t In = ql[4].n;
      if (isa >= ISA_AVX2) silu_mul_avx2(yo, yo + In, In, x.data());
      else for (int64_t i = 0; i < In; ++i) x[i] = yo[i] / (1.f + std::exp(-yo[i])) * yo[In + i];
      {
        DecodeIn in = input(In);
        decode_gemv(ql + 6, 1, in, tid, nt, accp, rsp, yb);
      }
#pragma omp barrier
      for (int64_t i = 0; i < D; ++i) h[i] += yb[i];
    }
    decode_rmsnorm(h.data(), norms[2 * L].data_ptr<float>(), D, fe, isa, x.data());
    DecodeIn in = input(D);
    decode_gemv(&lin.back(), 1, in, tid, nt, accp, rsp, lp);
  }
  return logits;
}

}  // namespace

TORCH_LIBRARY(qdsl_kernels, m) {
  m.def("w8_linear(Tensor x, Tensor w, Tensor w_scale, Tensor? bias, int isa) -> Tensor");
  m.def("w8a8_linear(Tensor xq, Tensor x_scale, Tensor? x_zp, Tensor w, Tensor w_scale, "
        "Tensor? w_rowsum, Tensor? bias, int isa) -> Tensor");
  m.def("w8a8_linear_cat(Tensor xq, Tensor x_scale, Tensor? x_zp, Tensor[] w, "
        "Tensor[] w_scale, Tensor?[] w_rowsum, Tensor?[] bias, int isa) -> Tensor");
  m.def("w4_linear(Tensor x, Tensor packed, Tensor scale, int gs, Tensor? bias, int isa) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, int n, float scale, "
        "int isa=1) -> Tensor");
  m.def("llama_decode_step(Tensor embed, Tensor embed_scale, int token, Tensor[] norms, "
        "Tensor[] w, Tensor[] w_scale, Tensor?[] bias, Tensor[] k_cache, Tensor[] v_cache, "
        "Tensor inv_freq, float rope_scale, int pos, int heads, float eps, float scale, "
        "int isa, int[] a_bits=[]) -> Tensor");
  m.def("cached_decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, "
        "Tensor cache_position, float scale, int isa=1) -> Tensor");
}

TORCH_LIBRARY_IMPL(qdsl_kernels, CPU, m) {
  m.impl("w8_linear", &w8_linear);
  m.impl("w8a8_linear", &w8a8_linear);
  m.impl("w8a8_linear_cat", &w8a8_linear_cat);
  m.impl("w4_linear", &w4_linear);
  m.impl("decode_attention", &decode_attention);
  m.impl("cached_decode_attention", &cached_decode_attention);
  m.impl("llama_decode_step", &llama_decode_step);
}
