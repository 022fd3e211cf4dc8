// qdsl's w4a8 kernel: packed 4-bit weights times 8-bit activations in integers (part of
// torch.ops.qdsl_kernels; cext.py builds it with qdsl_kernels.cpp and qdsl_gemm.cpp).
//
//   w4a8_linear(x f32 [M, K], packed u8 [N, K/2], scale f32 [N, K/gs], gs, bias?, per_token,
//               isa)  y = x_hat @ w^T + bias
//   w4a8_linear_cat(x, packed[], scale[], gs, bias?[], per_token, isa)  the same for several
//               weights of one group size on one input (x quantized once), their outputs
//               side by side [M, sum N]
//
// x_hat: x quantized to 8 bits, symmetric, per token or per tensor (quantize_rows: the codes
// v and scale s of qdsl's fake-quant); w = (u - 8) * scale[n, k / gs], u the packed 4-bit
// codes, two a byte, low nibble first (packed.py). Per group the products are summed
// exactly in int32 and scaled in float32: y[m, n] = s[m] * sum_g scale[n, g] * sum_{k in g}
// (u - 8) v + bias[n]. This is the contract of llama.cpp's Q4_0 x Q8_0 dot product (integer
// products per group, one float multiply per group), here with qdsl's codes: the result
// differs from the fake-quant maths (x_hat @ dequantized w) by float32 summation order only.
//
// The SIMD paths (AVX2, AVX-512, AVX-512 VNNI) read a block of B input columns (B = 64 on
// AVX2, 128 on AVX-512) as B/2 packed bytes: the low nibbles (even columns) and the high
// nibbles (odd columns) as two vectors of unsigned bytes, each multiplied by the matching
// activation codes (`vpdpbusd`; `vpmaddubsw` + `vpmaddwd` without VNNI). The activation is
// rearranged once per call so that this needs no shuffle of the weight: each block of x as
// [even columns | odd columns] (`w4a8_quantize_row`). A 32-bit lane then sums input columns
// 8l .. 8l + 7 of its block, so a group of gs >= 8 columns is whole lanes: where groups span
// several blocks (gs a multiple of B above B, or one group a row longer than a block) the
// lanes sum a group's blocks in int32 and one FMA applies its scale; where a block holds
// one or more whole groups (gs = 32, 64, 128 on AVX-512; 32, 64 on AVX2) each block's
// lanes are scaled by a vector of their groups' scales.
// The -8 of u - 8 is moved onto x: sum (u - 8) v = sum u v - 8 sum v, the second term per
// lane computed with the rearranged codes and loaded as the lane sums' starting value.
// Four weight rows per pass (the GEMV row kernels' shape, qdsl_kernels.cpp); the K tail
// (K not a multiple of B) a masked load of the packed bytes against zero-padded codes.
#include "qdsl_common.h"
#include <ATen/Parallel.h>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t W4A8_LANE = 8;   // input columns a 32-bit lane sums (4 bytes of each nibble)

// Whether groups of gs columns span several blocks of B: one int32 sum per group (a group
// of one block takes the other layout, with one group a block: the faster loop)
inline bool w4a8_whole(int64_t gs, int64_t K, int64_t B) {
  return gs > B && (gs == K || gs % B == 0);
}

// Whether the SIMD path with blocks of B takes groups of gs: whole blocks, or whole lanes
// inside a block
// inside a block (K a multiple of 32: the AVX2 K tail is 16 bytes)
inline bool w4a8_simd(int64_t gs, int64_t K, int64_t B) {
  return K % 32 == 0 && (w4a8_whole(gs, K, B) || (B % gs == 0 && gs % W4A8_LANE == 0));
}

// The layout of one call: blocks of B columns, K padded to Kp, U scaling units a row (the
// groups where they span whole blocks, else the blocks), BPU blocks a unit.
struct W4a8Layout {
  int64_t B, Kp, nb, U, bpu;
  bool whole;
  W4a8Layout(int64_t K, int64_t gs, int64_t B_) : B(B_) {
    Kp = (K + B - 1) / B * B;
    nb = Kp / B;
    whole = w4a8_whole(gs, K, B);
    U = whole ? K / gs : nb;
    bpu = nb / U;
  }
};

// max |x| over L floats (L % 8 == 0)
__attribute__((target("avx2,fma")))
static float w4a8_amax(const float* x, int64_t L) {
  const __m256 abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m = _mm256_setzero_ps();
  for (int64_t k = 0; k < L; k += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(x + k), abs));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

// One row of x [K] quantized with scale s (codes clamp(round(x / s), -127, 127), round half
// to even: quantize_rows' codes) straight into the rearranged layout: xv [Kp], each block as
// [even columns | odd columns], zero padded; init [U, B / 8]: per unit and lane, -8 * the
// sum of the lane's codes (columns 8l .. 8l + 7 of each of the unit's blocks). AVX2, K % 32 == 0.
__attribute__((target("avx2,fma")))
static void w4a8_quantize_row(const float* x, int64_t K, float s, const W4a8Layout& L,
                              int8_t* xv, int32_t* init) {
  const int64_t H = L.B / 2, lanes = L.B / W4A8_LANE;
  const __m256 inv = _mm256_set1_ps(1.f / s), qmin = _mm256_set1_ps(-127.f),
               qmax = _mm256_set1_ps(127.f);
  const __m128 minus8 = _mm_set1_ps(-8.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  std::fill(init, init + L.U * lanes, 0);
  if (L.Kp != K) std::memset(xv + (L.nb - 1) * L.B, 0, L.B);     // the padded last block
  for (int64_t k = 0; k < K; k += 32) {                          // 32 columns at a time
    __m256 q[4];
    for (int i = 0; i < 4; ++i)
      q[i] = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(
          _mm256_mul_ps(_mm256_loadu_ps(x + k + 8 * i), inv),
          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), qmin), qmax);
    const int64_t b = k / L.B, j = (k % L.B) / 2;
    // the four lanes' starts (sums of up to 8 codes: exact in float32)
    int32_t* in = init + (b / L.bpu) * lanes + (k % L.B) / W4A8_LANE;
    const __m128i sums = _mm_cvtps_epi32(_mm_mul_ps(reduce4_ps_256(q[0], q[1], q[2], q[3]), minus8));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(in),
                     _mm_add_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in)), sums));
    // even and odd columns (shuffle_ps per 128-bit lane, then the lanes' halves in order)
    const __m256i e01 = _mm256_cvtps_epi32(_mm256_castpd_ps(_mm256_permute4x64_pd(
        _mm256_castps_pd(_mm256_shuffle_ps(q[0], q[1], 0x88)), 0xD8)));
    const __m256i e23 = _mm256_cvtps_epi32(_mm256_castpd_ps(_mm256_permute4x64_pd(
        _mm256_castps_pd(_mm256_shuffle_ps(q[2], q[3], 0x88)), 0xD8)));
    const __m256i o01 = _mm256_cvtps_epi32(_mm256_castpd_ps(_mm256_permute4x64_pd(
        _mm256_castps_pd(_mm256_shuffle_ps(q[0], q[1], 0xDD)), 0xD8)));
    const __m256i o23 = _mm256_cvtps_epi32(_mm256_castpd_ps(_mm256_permute4x64_pd(
        _mm256_castps_pd(_mm256_shuffle_ps(q[2], q[3], 0xDD)), 0xD8)));
    // to bytes: 16 evens then 16 odds (packs interleave the 128-bit lanes: `order` undoes it)
    const __m256i bytes = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(e01, e23), _mm256_packs_epi32(o01, o23)), order);
    int8_t* o = xv + b * L.B;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + j), _mm256_castsi256_si128(bytes));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + H + j), _mm256_extracti128_si256(bytes, 1));
  }
}

// ---------------------------------------------------------------- generic

void w4a8_rows_generic(const int8_t* v, int64_t M, const uint8_t* p, const float* sc,
                       int64_t K, int64_t gs, int64_t n0, int64_t n1, float* y, int64_t N) {
  const int64_t G = K / gs, KB = K / 2;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float total = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        int32_t s = 0;
        for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
          const uint8_t b = p[n * KB + k / 2];
          s += (int32_t((k & 1) ? (b >> 4) : (b & 15)) - 8) * int32_t(v[m * K + k]);
        }
        total += float(s) * sc[n * G + g];
      }
      y[m * N + n] = total;
    }
}

// ---------------------------------------------------------------- SIMD rows

// What the row blocks read: the rearranged codes and lane starts, the packed weight and
// its layout, the epilogue's activation scales and bias. Block functions copy it into
// locals (nothing here aliases the output).
struct W4a8Args {
  const int8_t* xv; const int32_t* init; const uint8_t* p; const float* sc;
  int64_t Kp, KB, G, nb, U, bpu, gpb;  // gpb: groups a block (non-whole layouts)
  uint64_t wtail;                      // the last block's packed bytes (a byte mask)
  uint32_t sfull, stail;               // a block's groups, the last block's (lane masks)
  const float* xs; const float* bias; float* y; int64_t N;
  alignas(64) int32_t ix[16];          // lane -> group of its block (non-whole): l * 8 / gs
};

// AVX2 (B = 64): 32 packed bytes a block, vpmaddubsw + vpmaddwd into int32 lanes
template <int MM>
__attribute__((target("avx2,fma"), always_inline))
static inline void w4a8_dot_avx2(const int8_t* xb, int64_t Kp, __m256i raw, __m256i (&a0)[MM],
                                 __m256i (&a1)[MM]) {
  const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  const __m256i lo = _mm256_and_si256(raw, m4);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
  for (int m = 0; m < MM; ++m) {
    const __m256i* x = reinterpret_cast<const __m256i*>(xb + m * Kp);
    a0[m] = _mm256_add_epi32(a0[m], _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(x)), ones));
    a1[m] = _mm256_add_epi32(a1[m], _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_loadu_si256(x + 1)), ones));
  }
}

// one packed row against MM activation rows, accumulated into t[0..MM)
template <int MM, bool WHOLE>
__attribute__((target("avx2,fma"), always_inline))
static inline void w4a8_row_avx2(const W4a8Args& a, const uint8_t* pr, const float* scr,
                                 __m256i idx, __m256i sfull, __m256i stail, __m256 (&t)[MM]) {
  const int64_t last = a.nb - 1;
  auto raw = [&](int64_t b) __attribute__((target("avx2,fma"), always_inline)) {
    const uint8_t* q = pr + b * 32;
    return b < last || a.wtail == ~uint64_t(0)
        ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q))
        : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  };
  __m256i a0[MM], a1[MM];
  if constexpr (WHOLE) {                 // groups span blocks: int32 over a group, one FMA
    for (int64_t b = 0, u = 0, left = 0; b < a.nb; ++b) {
      if (left == 0) {                   // a group starts
        for (int m = 0; m < MM; ++m) {
          a0[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.init + (m * a.U + u) * 8));
          a1[m] = _mm256_setzero_si256();
        }
        left = a.bpu;
      }
      w4a8_dot_avx2<MM>(a.xv + b * 64, a.Kp, raw(b), a0, a1);
      if (--left == 0) {                 // and ends
        const __m256 s = _mm256_set1_ps(scr[u++]);
        for (int m = 0; m < MM; ++m)
          t[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a0[m], a1[m])), s, t[m]);
      }
    }
  } else {                               // groups inside a block: its lanes' scales
    for (int64_t b = 0; b < a.nb; ++b) {
      for (int m = 0; m < MM; ++m) {
        a0[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.init + (m * a.U + b) * 8));
        a1[m] = _mm256_setzero_si256();
      }
      w4a8_dot_avx2<MM>(a.xv + b * 64, a.Kp, raw(b), a0, a1);
      const __m256 s = _mm256_permutevar8x32_ps(
          _mm256_maskload_ps(scr + b * a.gpb, b < last ? sfull : stail), idx);
      for (int m = 0; m < MM; ++m)
        t[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a0[m], a1[m])), s, t[m]);
    }
  }
}

// AVX-512 (B = 128) with and without VNNI: 64 packed bytes a block, DOT the lane sums of
// u8 x s8 products (vpdpbusd; vpmaddubsw + vpmaddwd)
#define QDSL_W4A8_ROW_512(NAME, TARGET, DOT)                                                 \
  template <int MM>                                                                          \
  __attribute__((target(TARGET), always_inline))                                             \
  static inline void NAME##_dot(const int8_t* xb, int64_t Kp, __m512i raw, __m512i (&a0)[MM],\
                                __m512i (&a1)[MM]) {                                         \
    const __m512i m4 = _mm512_set1_epi8(15), ones = _mm512_set1_epi16(1);                    \
    (void)ones;                                                                              \
    const __m512i lo = _mm512_and_si512(raw, m4);                                            \
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);                      \
    for (int m = 0; m < MM; ++m) {                                                           \
      a0[m] = DOT(a0[m], lo, _mm512_loadu_si512(xb + m * Kp));                               \
      a1[m] = DOT(a1[m], hi, _mm512_loadu_si512(xb + m * Kp + 64));                          \
    }                                                                                        \
  }                                                                                          \
  template <int MM, bool WHOLE>                                                              \
  __attribute__((target(TARGET), always_inline))                                             \
  static inline void NAME(const W4a8Args& a, const uint8_t* pr, const float* scr,            \
                          __m512i idx, __m512 (&t)[MM]) {                                    \
    const int64_t last = a.nb - 1;                                                           \
    __m512i a0[MM], a1[MM];                                                                  \
    if constexpr (WHOLE) {                                                                   \
      for (int64_t b = 0, u = 0, left = 0; b < a.nb; ++b) {                                  \
        if (left == 0) {                                   /* a group starts */              \
          for (int m = 0; m < MM; ++m) {                                                     \
            a0[m] = _mm512_loadu_si512(a.init + (m * a.U + u) * 16);                         \
            a1[m] = _mm512_setzero_si512();                                                  \
          }                                                                                  \
          left = a.bpu;                                                                      \
        }                                                                                    \
        NAME##_dot<MM>(a.xv + b * 128, a.Kp, _mm512_maskz_loadu_epi8(                        \
            b < last ? ~__mmask64(0) : __mmask64(a.wtail), pr + b * 64), a0, a1);            \
        if (--left == 0) {                                 /* and ends */                    \
          const __m512 s = _mm512_set1_ps(scr[u++]);                                         \
          for (int m = 0; m < MM; ++m)                                                       \
            t[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a0[m], a1[m])), s,    \
                                   t[m]);                                                    \
        }                                                                                    \
      }                                                                                      \
    } else {                                                                                 \
      for (int64_t b = 0; b < a.nb; ++b) {                                                   \
        for (int m = 0; m < MM; ++m) {                                                       \
          a0[m] = _mm512_loadu_si512(a.init + (m * a.U + b) * 16);                           \
          a1[m] = _mm512_setzero_si512();                                                    \
        }                                                                                    \
        NAME##_dot<MM>(a.xv + b * 128, a.Kp, _mm512_maskz_loadu_epi8(                        \
            b < last ? ~__mmask64(0) : __mmask64(a.wtail), pr + b * 64), a0, a1);            \
        const __m512 s = _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(                   \
            __mmask16(b < last ? a.sfull : a.stail), scr + b * a.gpb));                      \
        for (int m = 0; m < MM; ++m)                                                         \
          t[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a0[m], a1[m])), s, t[m]); \
      }                                                                                      \
    }                                                                                        \
  }

#define QDSL_DOT_BW(acc, u, x) \
  _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, x), ones))
#define QDSL_DOT_VNNI(acc, u, x) _mm512_dpbusd_epi32(acc, u, x)
QDSL_W4A8_ROW_512(w4a8_row_avx512, "avx512f,avx512bw,avx512vl", QDSL_DOT_BW)
QDSL_W4A8_ROW_512(w4a8_row_vnni, "avx512f,avx512bw,avx512vl,avx512vnni", QDSL_DOT_VNNI)
#undef QDSL_DOT_BW
#undef QDSL_DOT_VNNI
#undef QDSL_W4A8_ROW_512

// ---------------------------------------------------------------- row blocks

// y[m, n .. n + 4) = the four rows' sums * xs[m] + bias: one vector store
__attribute__((target("avx2")))
static inline void w4a8_store4(const W4a8Args& a, int64_t m, int64_t n, __m128 r) {
  r = _mm_mul_ps(r, _mm_set1_ps(a.xs[m]));
  if (a.bias) r = _mm_add_ps(r, _mm_loadu_ps(a.bias + n));
  _mm_storeu_ps(a.y + m * a.N + n, r);
}

static inline void w4a8_store1(const W4a8Args& a, int64_t m, int64_t n, float r) {
  a.y[m * a.N + n] = r * a.xs[m] + (a.bias ? a.bias[n] : 0.f);
}

// activation rows [m0, m0 + MM) against weight rows [n0, n1): four rows per pass, each read
// in address order into its own accumulators, their sums reduced together
template <int MM, bool WHOLE>
__attribute__((target("avx2,fma")))
void w4a8_avx2_block(const W4a8Args& args, int64_t m0, int64_t n0, int64_t n1) {
  W4a8Args a = args;
  a.xv += m0 * a.Kp;
  a.init += m0 * a.U * 8;
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(a.ix));
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sfull = _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(__builtin_popcount(a.sfull))), iota);
  const __m256i stail = _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(__builtin_popcount(a.stail))), iota);
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    __m256 t0[MM], t1[MM], t2[MM], t3[MM];
    for (int m = 0; m < MM; ++m) t0[m] = t1[m] = t2[m] = t3[m] = _mm256_setzero_ps();
    w4a8_row_avx2<MM, WHOLE>(a, a.p + n * a.KB, a.sc + n * a.G, idx, sfull, stail, t0);
    w4a8_row_avx2<MM, WHOLE>(a, a.p + (n + 1) * a.KB, a.sc + (n + 1) * a.G, idx, sfull, stail, t1);
    w4a8_row_avx2<MM, WHOLE>(a, a.p + (n + 2) * a.KB, a.sc + (n + 2) * a.G, idx, sfull, stail, t2);
    w4a8_row_avx2<MM, WHOLE>(a, a.p + (n + 3) * a.KB, a.sc + (n + 3) * a.G, idx, sfull, stail, t3);
    for (int m = 0; m < MM; ++m)
      w4a8_store4(args, m0 + m, n, reduce4_ps_256(t0[m], t1[m], t2[m], t3[m]));
  }
  for (; n < n1; ++n) {
    __m256 t[MM];
    for (int m = 0; m < MM; ++m) t[m] = _mm256_setzero_ps();
    w4a8_row_avx2<MM, WHOLE>(a, a.p + n * a.KB, a.sc + n * a.G, idx, sfull, stail, t);
    for (int m = 0; m < MM; ++m) w4a8_store1(args, m0 + m, n, hsum256(t[m]));
  }
}

#define QDSL_W4A8_BLOCK_512(NAME, ROW, TARGET)                                               \
  template <int MM, bool WHOLE>                                                              \
  __attribute__((target(TARGET)))                                                            \
  void NAME(const W4a8Args& args, int64_t m0, int64_t n0, int64_t n1) {                      \
    W4a8Args a = args;                                                                       \
    a.xv += m0 * a.Kp;                                                                       \
    a.init += m0 * a.U * 16;                                                                 \
    const __m512i idx = _mm512_load_si512(a.ix);                                             \
    int64_t n = n0;                                                                          \
    for (; n + 4 <= n1; n += 4) {                                                            \
      __m512 t0[MM], t1[MM], t2[MM], t3[MM];                                                 \
      for (int m = 0; m < MM; ++m) t0[m] = t1[m] = t2[m] = t3[m] = _mm512_setzero_ps();      \
      ROW<MM, WHOLE>(a, a.p + n * a.KB, a.sc + n * a.G, idx, t0);                            \
      ROW<MM, WHOLE>(a, a.p + (n + 1) * a.KB, a.sc + (n + 1) * a.G, idx, t1);                \
      ROW<MM, WHOLE>(a, a.p + (n + 2) * a.KB, a.sc + (n + 2) * a.G, idx, t2);                \
      ROW<MM, WHOLE>(a, a.p + (n + 3) * a.KB, a.sc + (n + 3) * a.G, idx, t3);                \
      for (int m = 0; m < MM; ++m)                                                           \
        w4a8_store4(args, m0 + m, n, reduce4_ps(t0[m], t1[m], t2[m], t3[m]));               \
    }                                                                                        \
    for (; n < n1; ++n) {                                                                    \
      __m512 t[MM];                                                                          \
      for (int m = 0; m < MM; ++m) t[m] = _mm512_setzero_ps();                               \
      ROW<MM, WHOLE>(a, a.p + n * a.KB, a.sc + n * a.G, idx, t);                             \
      for (int m = 0; m < MM; ++m) w4a8_store1(args, m0 + m, n, _mm512_reduce_add_ps(t[m])); \
    }                                                                                        \
  }

QDSL_W4A8_BLOCK_512(w4a8_avx512_block, w4a8_row_avx512, "avx512f,avx512bw,avx512vl")
QDSL_W4A8_BLOCK_512(w4a8_vnni_block, w4a8_row_vnni, "avx512f,avx512bw,avx512vl,avx512vnni")
#undef QDSL_W4A8_BLOCK_512

using W4a8Block = void (*)(const W4a8Args&, int64_t, int64_t, int64_t);

// the block for mm = 1..4 activation rows and the layout's kind, per path
template <template <int, bool> class Pick>
W4a8Block w4a8_block_for(int64_t mm, bool whole) {
  switch (mm) {
    case 1: return whole ? Pick<1, true>::f : Pick<1, false>::f;
    case 2: return whole ? Pick<2, true>::f : Pick<2, false>::f;
    case 3: return whole ? Pick<3, true>::f : Pick<3, false>::f;
    default: return whole ? Pick<4, true>::f : Pick<4, false>::f;
  }
}
template <int MM, bool W> struct PickAvx2 { static constexpr W4a8Block f = w4a8_avx2_block<MM, W>; };
template <int MM, bool W> struct PickAvx512 { static constexpr W4a8Block f = w4a8_avx512_block<MM, W>; };
template <int MM, bool W> struct PickVnni { static constexpr W4a8Block f = w4a8_vnni_block<MM, W>; };

// ---------------------------------------------------------------- driver

// the layout's fields of a call's arguments (blocks of L.B columns; the codes, scales,
// weight and output pointers are the caller's)
W4a8Args w4a8_layout_args(int64_t K, int64_t gs, const W4a8Layout& L) {
  const int64_t B = L.B;
  W4a8Args args{};
  args.Kp = L.Kp; args.KB = K / 2; args.G = K / gs; args.nb = L.nb; args.U = L.U;
  args.bpu = L.bpu; args.gpb = L.whole ? 1 : B / gs;
  const int64_t tail_bytes = K / 2 - (L.nb - 1) * (B / 2);           // 1 .. B / 2
  args.wtail = tail_bytes >= 64 ? ~uint64_t(0) : (~uint64_t(0)) >> (64 - tail_bytes);
  if (B == 64 && tail_bytes == 32) args.wtail = ~uint64_t(0);          // AVX2: a whole block
  const int64_t tail_groups = args.G - (L.nb - 1) * args.gpb;
  args.sfull = uint32_t((uint64_t(1) << args.gpb) - 1);
  args.stail = L.whole ? args.sfull : uint32_t((uint64_t(1) << tail_groups) - 1);
  for (int l = 0; l < 16; ++l) args.ix[l] = L.whole ? 0 : int32_t(l * W4A8_LANE / gs);
  return args;
}

// the row block for mm activation rows on `isa` (SIMD paths)
W4a8Block w4a8_pick(int64_t isa, int64_t mm, bool whole) {
  return isa >= ISA_VNNI ? w4a8_block_for<PickVnni>(mm, whole)
         : isa >= ISA_AVX512 ? w4a8_block_for<PickAvx512>(mm, whole)
                             : w4a8_block_for<PickAvx2>(mm, whole);
}

// one weight of a w4a8 call: its packed codes, scales and bias, rows [off, off + n) of y
struct W4a8Seg {
  const uint8_t* p; const float* sc; const float* bias;
  int64_t n, off;
};

// checks one weight against K and gs; -> its segment at off
W4a8Seg w4a8_seg(const at::Tensor& packed, const at::Tensor& scale,
                 const c10::optional<at::Tensor>& bias, int64_t K, int64_t gs, int64_t off,
                 const char* op) {
  check_tensor(packed, at::kByte, 2, op, "packed");
  check_tensor(scale, at::kFloat, 2, op, "scale");
  const int64_t N = packed.size(0);
  TORCH_CHECK(gs > 0 && K % gs == 0 && K % 2 == 0 && packed.size(1) == K / 2 &&
              scale.size(0) == N && scale.size(1) == K / gs, op, ": shape mismatch");
  const bool has_b = bias.has_value() && bias->defined();
  if (has_b) {
    check_tensor(*bias, at::kFloat, 1, op, "bias");
    TORCH_CHECK(bias->size(0) == N, op, ": bias shape mismatch");
  }
  return {packed.data_ptr<uint8_t>(), scale.data_ptr<float>(),
          has_b ? bias->data_ptr<float>() : nullptr, N, off};
}

// y [M, N] = the segments' outputs side by side: x quantized once, then one pass over the
// rows of all of them (threads split the N rows of the whole, not each weight's)
at::Tensor w4a8_run(const at::Tensor& x, const std::vector<W4a8Seg>& segs, int64_t N, int64_t gs,
                    bool per_token, int64_t isa) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const int64_t B = isa >= ISA_AVX512 ? 128 : 64;
  const bool simd = isa >= ISA_AVX2 && w4a8_simd(gs, K, B);
  const W4a8Layout L(K, gs, B);
  // temporaries: the codes (generic) or the rearranged codes and the lanes' starts (SIMD),
  // the rows' scales: per-thread buffers for a small call, as w8a8_linear's; allocated
  // beyond kScratchBytes
  const int64_t lanes = B / W4A8_LANE;
  const int64_t bytes_v = simd ? 0 : M * K, bytes_xv = simd ? M * L.Kp : 0,
                bytes_init = simd ? M * L.U * lanes * 4 : 0, bytes_s = M * 4;
  const int64_t total = bytes_v + bytes_xv + bytes_init + bytes_s + 64 * 4;
  static thread_local std::vector<uint8_t> tls;
  at::Tensor held;
  uint8_t* base;
  if (total <= kScratchBytes) {
    if (int64_t(tls.size()) < total) tls.resize(total);
    base = tls.data();
  } else {
    held = at::empty({total}, x.options().dtype(at::kByte));
    base = held.data_ptr<uint8_t>();
  }
  auto carve = [&base](int64_t n) {              // 64-byte aligned pieces
    uint8_t* p = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(base) + 63) & ~uintptr_t(63));
    base = p + n;
    return p;
  };
  int8_t* v = reinterpret_cast<int8_t*>(carve(bytes_v));
  int8_t* xv = reinterpret_cast<int8_t*>(carve(bytes_xv));
  int32_t* init = reinterpret_cast<int32_t*>(carve(bytes_init));
  float* xs = reinterpret_cast<float*>(carve(bytes_s));
  const float* xp = x.data_ptr<float>();
  // quantize the rows (SIMD: straight into the rearranged layout); per token the rows are
  // independent: threads split them
  if (simd) {
    const float s_all = per_token ? 0.f : sym_scale8(w4a8_amax(xp, M * K));
    at::parallel_for(0, M, std::max<int64_t>(1, 65536 / K), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        xs[m] = per_token ? sym_scale8(w4a8_amax(xp + m * K, K)) : s_all;
        w4a8_quantize_row(xp + m * K, K, xs[m], L, xv + m * L.Kp, init + m * L.U * lanes);
      }
    });
  } else {
    quantize_rows<int8_t>(xp, M, K, per_token, true, v, xs);
  }
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(8, 65536 / std::max<int64_t>(K / 2, 1));
  W4a8Args args = w4a8_layout_args(K, gs, L);
  args.xv = xv; args.init = init;
  args.xs = xs; args.N = N;
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (const W4a8Seg& g : segs) {              // each weight's rows in this chunk
      const int64_t a = std::max(n0, g.off) - g.off, b = std::min(n1, g.off + g.n) - g.off;
      if (a >= b) continue;
      if (!simd) {
        float* yg = yp + g.off;
        w4a8_rows_generic(v, M, g.p, g.sc, K, gs, a, b, yg, N);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = a; n < b; ++n)
            yg[m * N + n] = yg[m * N + n] * xs[m] + (g.bias ? g.bias[n] : 0.f);
        continue;
      }
      W4a8Args sa = args;
      sa.p = g.p; sa.sc = g.sc; sa.bias = g.bias; sa.y = yp + g.off;
      for (int64_t mb = 0; mb < M; mb += MB) {
        const int64_t mm = std::min(MB, M - mb);
        w4a8_pick(isa, mm, L.whole)(sa, mb, a, b);
      }
    }
  });
  return y;
}

at::Tensor w4a8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                       int64_t gs, const c10::optional<at::Tensor>& bias, bool per_token,
                       int64_t isa) {
  const char* op = "qdsl_kernels.w4a8_linear";
  check_tensor(x, at::kFloat, 2, op, "x");
  const std::vector<W4a8Seg> segs{w4a8_seg(packed, scale, bias, x.size(1), gs, 0, op)};
  return w4a8_run(x, segs, segs[0].n, gs, per_token, isa);
}

// several weights (one group size) on one input (a layer's q / k / v, or gate / up): their
// outputs side by side in one call, [M, sum of N]
at::Tensor w4a8_linear_cat(const at::Tensor& x, at::TensorList packed, at::TensorList scale,
                           int64_t gs, const c10::List<c10::optional<at::Tensor>>& bias,
                           bool per_token, int64_t isa) {
  const char* op = "qdsl_kernels.w4a8_linear_cat";
  check_tensor(x, at::kFloat, 2, op, "x");
  TORCH_CHECK(!packed.empty() && scale.size() == packed.size() && bias.size() == packed.size(),
              op, ": one scale and bias (or None) per weight");
  std::vector<W4a8Seg> segs;
  int64_t off = 0;
  for (size_t i = 0; i < packed.size(); ++i) {
    segs.push_back(w4a8_seg(packed[i], scale[i], bias.get(i), x.size(1), gs, off, op));
    off += segs.back().n;
  }
  return w4a8_run(x, segs, off, gs, per_token, isa);
}

// ---------------------------------------------------------------- one token, one thread

// The w4a8 linears of llama_decode_step (qdsl_kernels.cpp declares these three; cext.build
// compiles the sources as one translation unit): inside that op's parallel region each
// thread quantizes a linear's input once into its own W4a8Token (the 8-bit codes in the
// layout of (K, gs, isa) and their scale, quantize_rows' codes) and computes its share of
// each weight's rows against it: w4a8_run's maths for one row, without its parallel_for.
struct W4a8Token {
  std::vector<uint8_t> buf;
  int64_t K = -1, gs = -1, isa = -1;
  bool simd = false;
  float xs = 0.f;
  int8_t* v = nullptr;         // the generic path's codes
  W4a8Args args{};             // the SIMD paths' rearranged codes, lane starts and layout
  W4a8Block block = nullptr;
};

W4a8Token* w4a8_token() {
  static thread_local W4a8Token t;
  return &t;
}

// x [K] -> t's codes and scale (symmetric, per token: for one token the same as per
// tensor); -> the scale
float w4a8_token_quantize(W4a8Token* t, const float* x, int64_t K, int64_t gs, int64_t isa) {
  const int64_t B = isa >= ISA_AVX512 ? 128 : 64;
  const W4a8Layout L(K, gs, B);
  if (t->K != K || t->gs != gs || t->isa != isa) {            // lay the buffers out
    const int64_t lanes = B / W4A8_LANE;
    // no zero fill: quantize_row clears the lane starts and the padded block, the
    // generic path writes all K codes
    const size_t need = size_t(K + L.Kp + L.U * lanes * 4 + 3 * 64);
    if (t->buf.size() < need) t->buf.resize(need);
    uint8_t* base = t->buf.data();
    auto carve = [&base](int64_t n) {                           // 64-byte aligned pieces
      uint8_t* p = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(base) + 63) & ~uintptr_t(63));
      base = p + n;
      return p;
    };
    t->K = K; t->gs = gs; t->isa = isa;
    t->simd = isa >= ISA_AVX2 && w4a8_simd(gs, K, B);
    t->v = reinterpret_cast<int8_t*>(carve(K));
    t->args = w4a8_layout_args(K, gs, L);
    t->args.xv = reinterpret_cast<int8_t*>(carve(L.Kp));
    t->args.init = reinterpret_cast<int32_t*>(carve(L.U * lanes * 4));
    t->args.xs = &t->xs;
    t->args.N = 0;                                              // one row: y[n]
    t->block = t->simd ? w4a8_pick(isa, 1, L.whole) : nullptr;
  }
  if (t->simd) {
    t->xs = sym_scale8(w4a8_amax(x, K));
    w4a8_quantize_row(x, K, t->xs, L, const_cast<int8_t*>(t->args.xv),
                      const_cast<int32_t*>(t->args.init));
  } else {
    quantize_rows<int8_t>(x, 1, K, true, true, t->v, &t->xs);
  }
  return t->xs;
}

// y[n] for n in [n0, n1): rows of the packed weight p / scales sc [N, K / gs] (+ bias)
// against t's codes
void w4a8_token_rows(const W4a8Token* t, const uint8_t* p, const float* sc, const float* bias,
                     int64_t n0, int64_t n1, float* y) {
  if (!t->simd) {
    w4a8_rows_generic(t->v, 1, p, sc, t->K, t->gs, n0, n1, y, 0);
    for (int64_t n = n0; n < n1; ++n) y[n] = y[n] * t->xs + (bias ? bias[n] : 0.f);
    return;
  }
  W4a8Args a = t->args;
  a.p = p; a.sc = sc; a.bias = bias; a.y = y;
  t->block(a, 0, n0, n1);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qdsl_kernels, m) {
  m.def("w4a8_linear(Tensor x, Tensor packed, Tensor scale, int gs, Tensor? bias, "
        "bool per_token, int isa) -> Tensor");
  m.def("w4a8_linear_cat(Tensor x, Tensor[] packed, Tensor[] scale, int gs, Tensor?[] bias, "
        "bool per_token, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(qdsl_kernels, CPU, m) {
  m.impl("w4a8_linear", &w4a8_linear);
  m.impl("w4a8_linear_cat", &w4a8_linear_cat);
}
