// qdsl's 1-bit weight kernel (qdsl/runtime/kernels/binary.py builds this with
// torch.utils.cpp_extension.load_inline on first use and registers it as
// torch.ops.qdsl_binary). A separate extension from qdsl_kernels.cpp.
//
//   w1_linear(x float32 [M, K], packed uint8 [N, ceil(K/8)], scale float32 [N, K/gs], gs,
//             bias?, isa) -> float32 [M, N]
//
// Weights are XTC's binary codes, one bit each, 8 to a byte, element k of a row in
// byte k/8 at bit k%8 (runtime/packing.py): bit 1 is +scale, bit 0 is -scale. Per
// group g of gs columns (gs = K: per output row),
//   y[m, n] = sum_g scale[n, g] * (sum_{k in g, bit 1} x[m, k] - sum_{k in g, bit 0} x[m, k])
//           = sum_g scale[n, g] * (2 * S1[m, n, g] - Sx[m, g]) + bias[n],
// so the inner loop is one masked add per element (the mask is the weight bits
// themselves: AVX-512 reads 16 bits as a __mmask16; AVX2 widens 8 bits to a lane mask),
// Sx (the group sums of x) is computed once per call, and the weight is read once per
// block of up to 4 activation rows. Output rows are spread over threads
// (at::parallel_for, OpenMP). isa: 0 generic C++, 1 AVX2, >= 2 AVX-512 (qdsl_common.h;
// each path compiled for its target with __attribute__((target))).
// The vector paths need gs % 16 == 0 (others run the generic loop).
//
//   w1a8_linear(x, packed, scale, gs, bias?, per_token, symmetric, isa): the same with x
//             quantized to 8 bits in the kernel (XTC's 1W8A; see the section below).
//   w1a8_gemm(x, packed, scale, gs, bias?, per_token, isa): w1a8_linear, symmetric x only,
//             AVX2 and gs % 32 == 0: the weight bits of 8 output rows expanded to +-1 int8
//             once and reused by every activation row, 32 products per instruction (the
//             last section). Same result bit for bit; faster at one row and at many.
#include "qdsl_common.h"
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

inline int bit_at(const uint8_t* row, int64_t k) { return (row[k >> 3] >> (k & 7)) & 1; }

// The row kernels' element type T: float (w1: x itself; xs its group sums) or int32_t
// (w1a8: x's 8-bit codes v and their group sums vs, exact). Both compute per group
// scale * (2 * S1 - xs), S1 the sum under the weight's 1 bits, then times xscale[m]
// where there is one (w1a8: x's quantization scale; w1 passes null). The groups are
// accumulated with an explicit fused multiply-add (std::fma), so every path and
// w1a8_gemm round alike whatever the compiler's contraction setting.
template <typename T>
void sign_rows_generic(const T* x, int64_t M, const uint8_t* w, int64_t KB, const float* scale,
                       const T* xs, const float* xscale, int64_t K, int64_t gs, int64_t n0,
                       int64_t n1, float* y, int64_t N) {
  const int64_t G = K / gs;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * KB;
    for (int64_t m = 0; m < M; ++m) {
      const T* xr = x + m * K;
      float out = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        T s1 = 0;
        for (int64_t k = g * gs; k < (g + 1) * gs; ++k)
          if (bit_at(wr, k)) s1 += xr[k];
        out = std::fma(scale[n * G + g], float(T(2) * s1 - xs[m * G + g]), out);
      }
      y[m * N + n] = xscale ? out * xscale[m] : out;
    }
  }
}

// 8 weight bits -> 8 lanes of all-ones / zeros
__attribute__((target("avx2,fma")))
static inline __m256 lane_mask(uint8_t b, __m256i bitsel) {
  __m256i v = _mm256_and_si256(_mm256_set1_epi32(b), bitsel);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(v, bitsel));
}

// (the row kernels' signature; w1 has no xscale: null)
__attribute__((target("avx2,fma")))
void w1_rows_avx2(const float* x, int64_t M, const uint8_t* w, int64_t KB, const float* scale,
                  const float* xs, const float* /*xscale*/, int64_t K, int64_t gs, int64_t n0,
                  int64_t n1, float* y, int64_t N) {
  const int64_t G = K / gs;
  const __m256i bitsel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  for (int64_t mb = 0; mb < M; mb += MB) {
    const int64_t mm = std::min(MB, M - mb);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* wr = w + n * KB;
      float out[MB] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t g = 0; g < G; ++g) {
        __m256 a[MB][2];
        for (int64_t m = 0; m < MB; ++m) a[m][0] = a[m][1] = _mm256_setzero_ps();
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
          const __m256 lo = lane_mask(wr[k >> 3], bitsel);
          const __m256 hi = lane_mask(wr[(k >> 3) + 1], bitsel);
          for (int64_t m = 0; m < mm; ++m) {
            const float* xr = x + (mb + m) * K + k;
            a[m][0] = _mm256_add_ps(a[m][0], _mm256_and_ps(lo, _mm256_loadu_ps(xr)));
            a[m][1] = _mm256_add_ps(a[m][1], _mm256_and_ps(hi, _mm256_loadu_ps(xr + 8)));
          }
        }
        const float sc = scale[n * G + g];
        for (int64_t m = 0; m < mm; ++m) {
          const float s1 = hsum256(_mm256_add_ps(a[m][0], a[m][1]));
          out[m] = std::fma(sc, 2.f * s1 - xs[(mb + m) * G + g], out[m]);
        }
      }
      for (int64_t m = 0; m < mm; ++m) y[(mb + m) * N + n] = out[m];
    }
  }
}

// 16 lanes of T, and the masked add the AVX-512 path is made of (the mask: 16 weight bits)
template <typename T> struct Lanes512;

#define QDSL_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
template <> struct Lanes512<float> {
  using V = __m512;
  QDSL_AVX512 static inline V zero() { return _mm512_setzero_ps(); }
  QDSL_AVX512 static inline V load(const float* p) { return _mm512_loadu_ps(p); }
  QDSL_AVX512 static inline V mask_add(V a, __mmask16 k, V x) {
    return _mm512_mask_add_ps(a, k, a, x);
  }
  QDSL_AVX512 static inline float sum(V a) { return _mm512_reduce_add_ps(a); }
};

template <> struct Lanes512<int32_t> {
  using V = __m512i;
  QDSL_AVX512 static inline V zero() { return _mm512_setzero_si512(); }
  QDSL_AVX512 static inline V load(const int32_t* p) { return _mm512_loadu_si512(p); }
  QDSL_AVX512 static inline V mask_add(V a, __mmask16 k, V x) {
    return _mm512_mask_add_epi32(a, k, a, x);
  }
  QDSL_AVX512 static inline int32_t sum(V a) { return _mm512_reduce_add_epi32(a); }
};

// NR output rows at a time (independent accumulators: the masked adds do not wait on
// each other), 16 weights per step
constexpr int64_t NR = 4;

template <typename T>
QDSL_AVX512 void sign_rows_avx512(const T* x, int64_t M, const uint8_t* w, int64_t KB,
                                  const float* scale, const T* xs, const float* xscale,
                                  int64_t K, int64_t gs, int64_t n0, int64_t n1, float* y,
                                  int64_t N) {
  using L = Lanes512<T>;
  const int64_t G = K / gs;
  for (int64_t mb = 0; mb < M; mb += MB) {
    const int64_t mm = std::min(MB, M - mb);
    for (int64_t nb = n0; nb < n1; nb += NR) {
      const int64_t nn = std::min(NR, n1 - nb);
      float out[NR][MB] = {};
      for (int64_t g = 0; g < G; ++g) {
        typename L::V a[NR][MB];
        for (int64_t r = 0; r < NR; ++r)
          for (int64_t m = 0; m < MB; ++m) a[r][m] = L::zero();
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
          typename L::V xv[MB];
          for (int64_t m = 0; m < mm; ++m) xv[m] = L::load(x + (mb + m) * K + k);
          for (int64_t r = 0; r < nn; ++r) {
            uint16_t bits;
            std::memcpy(&bits, w + (nb + r) * KB + (k >> 3), 2);
            for (int64_t m = 0; m < mm; ++m)
              a[r][m] = L::mask_add(a[r][m], (__mmask16)bits, xv[m]);
          }
        }
        for (int64_t r = 0; r < nn; ++r) {
          const float sc = scale[(nb + r) * G + g];
          for (int64_t m = 0; m < mm; ++m)
            out[r][m] = std::fma(sc, float(T(2) * L::sum(a[r][m]) - xs[(mb + m) * G + g]),
                                 out[r][m]);
        }
      }
      for (int64_t r = 0; r < nn; ++r)
        for (int64_t m = 0; m < mm; ++m)
          y[(mb + m) * N + nb + r] = xscale ? out[r][m] * xscale[mb + m] : out[r][m];
    }
  }
}
#undef QDSL_AVX512

// ---------------------------------------------------------------- w1a8: 8-bit activations
// x is quantized here (qdsl_common.h's quantize_rows, exactly as qdsl's fake-quant),
// and the sums over the weight bits are exact int32: y = s * scale * (2 * V1 - V) + bias.

__attribute__((target("avx2,fma")))
void w1a8_rows_avx2(const int32_t* v, int64_t M, const uint8_t* w, int64_t KB,
                    const float* scale, const int32_t* vs, const float* xscale, int64_t K,
                    int64_t gs, int64_t n0, int64_t n1, float* y, int64_t N) {
  const int64_t G = K / gs;
  const __m256i bitsel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  for (int64_t mb = 0; mb < M; mb += MB) {
    const int64_t mm = std::min(MB, M - mb);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* wr = w + n * KB;
      float out[MB] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t g = 0; g < G; ++g) {
        __m256i a[MB];
        for (int64_t m = 0; m < MB; ++m) a[m] = _mm256_setzero_si256();
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 8) {
          const __m256i lm = _mm256_cmpeq_epi32(
              _mm256_and_si256(_mm256_set1_epi32(wr[k >> 3]), bitsel), bitsel);
          for (int64_t m = 0; m < mm; ++m) {
            const __m256i xv = _mm256_loadu_si256(
                reinterpret_cast<const __m256i*>(v + (mb + m) * K + k));
            a[m] = _mm256_add_epi32(a[m], _mm256_and_si256(lm, xv));
          }
        }
        const float sc = scale[n * G + g];
        for (int64_t m = 0; m < mm; ++m)
          out[m] = std::fma(sc, float(2 * hsum256i(a[m]) - vs[(mb + m) * G + g]), out[m]);
      }
      for (int64_t m = 0; m < mm; ++m) y[(mb + m) * N + n] = out[m] * xscale[mb + m];
    }
  }
}

// The arguments both ops take: x, the packed weight and its scales, checked as one;
// the bias, checked and added.
void check_w1(const char* op, const at::Tensor& x, const at::Tensor& packed,
              const at::Tensor& scale, int64_t gs) {
  check_tensor(x, at::kFloat, 2, op, "x"); check_tensor(packed, at::kByte, 2, op, "packed");
  check_tensor(scale, at::kFloat, 2, op, "scale");
  const int64_t K = x.size(1), N = packed.size(0), KB = packed.size(1);
  TORCH_CHECK(gs > 0 && K % gs == 0 && KB == (K + 7) / 8 && scale.size(0) == N &&
              scale.size(1) == K / gs, op, ": shape mismatch");
}

void add_bias(const char* op, at::Tensor& y, const c10::optional<at::Tensor>& bias) {
  if (bias.has_value() && bias->defined()) {
    check_tensor(*bias, at::kFloat, 1, op, "bias");
    TORCH_CHECK(bias->size(0) == y.size(1), op, ": bias shape mismatch");
    y.add_(*bias);
  }
}

// grain of the parallel loop over output rows (KB packed bytes a row)
int64_t grain(int64_t KB) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, KB)); }

at::Tensor w1_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                     int64_t gs, const c10::optional<at::Tensor>& bias, int64_t isa) {
  check_w1("qdsl_binary.w1_linear", x, packed, scale, gs);
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), KB = packed.size(1);
  const int64_t G = K / gs;
  // the group sums of x, once per call (shared by every output row)
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>(); const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  std::vector<float> xs_buf(M * G);
  for (int64_t i = 0; i < M * G; ++i) {
    float s = 0.f;
    for (int64_t k = i * gs; k < (i + 1) * gs; ++k) s += xp[k];  // x is [M, G, gs] row-major
    xs_buf[i] = s;
  }
  const float* xsp = xs_buf.data();
  float* yp = y.data_ptr<float>();
  // the vector paths step 16 weights at a time
  const auto rows = pick_isa(gs % 16 == 0 ? isa : ISA_GENERIC, sign_rows_generic<float>,
                             w1_rows_avx2, sign_rows_avx512<float>);
  at::parallel_for(0, N, grain(KB), [&](int64_t n0, int64_t n1) {
    rows(xp, M, pp, KB, sp, xsp, nullptr, K, gs, n0, n1, yp, N);
  });
  add_bias("qdsl_binary.w1_linear", y, bias);
  return y;
}

at::Tensor w1a8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                       int64_t gs, const c10::optional<at::Tensor>& bias, bool per_token,
                       bool symmetric, int64_t isa) {
  check_w1("qdsl_binary.w1a8_linear", x, packed, scale, gs);
  // quantize_rows reads x[0]
  TORCH_CHECK(x.size(0) > 0, "qdsl_binary.w1a8_linear: shape mismatch");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), KB = packed.size(1);
  const int64_t G = K / gs;
  std::vector<int32_t> v(M * K), vs(M * G, 0);
  std::vector<float> xscale(M);
  quantize_rows<int32_t>(x.data_ptr<float>(), M, K, per_token, symmetric, v.data(),
                         xscale.data());
  for (int64_t i = 0; i < M * G; ++i)
    for (int64_t k = i * gs; k < (i + 1) * gs; ++k) vs[i] += v[k];
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* pp = packed.data_ptr<uint8_t>(); const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const auto rows = pick_isa(gs % 16 == 0 ? isa : ISA_GENERIC, sign_rows_generic<int32_t>,
                             w1a8_rows_avx2, sign_rows_avx512<int32_t>);
  at::parallel_for(0, N, grain(KB), [&](int64_t n0, int64_t n1) {
    rows(v.data(), M, pp, KB, sp, vs.data(), xscale.data(), K, gs, n0, n1, yp, N);
  });
  add_bias("qdsl_binary.w1a8_linear", y, bias);
  return y;
}

// ---------------------------------------------------------------- w1a8 GEMM (prefill)
// Symmetric 8-bit codes fit int8 ([-127, 127]). Per block of GR output rows and group g,
// the rows' bits are expanded once to +-1 int8 (bit 1: +1) and reused by every activation
// row; per row and 32 weights: _mm256_sign_epi8(x, w) = x * w (exact: |x| <= 127),
// _mm256_maddubs_epi16(1, .) sums pairs into int16 (|.| <= 254), accumulated in int16 for
// at most 64 steps (|.| <= 16256), then widened to int32 (_mm256_madd_epi16 with 1). The
// int32 sum is 2 * V1 - V exactly and the float epilogue is the row kernels' (per group
// in order, then times the row's scale), so the result is theirs bit for bit.

constexpr int64_t GR = 8;          // output rows per expanded block (one vector of sums)
constexpr int64_t I16_STEPS = 64;  // 32-weight steps an int16 accumulator takes safely

// 32 weight bits (4 bytes) -> 32 int8 of +-1
__attribute__((target("avx2,fma")))
static inline __m256i expand_signs(const uint8_t* b) {
  int32_t word;
  std::memcpy(&word, b, 4);
  const __m256i rep = _mm256_shuffle_epi8(
      _mm256_set1_epi32(word),  // each 128-bit lane: bytes 0-1 (low lane) / 2-3 (high lane)
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                       2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i sel = _mm256_set1_epi64x(0x8040201008040201LL);  // byte j: bit j % 8
  const __m256i on = _mm256_cmpeq_epi8(_mm256_and_si256(rep, sel), sel);
  return _mm256_sub_epi8(_mm256_and_si256(on, _mm256_set1_epi8(2)), _mm256_set1_epi8(1));
}

// lane r = the sum of a[r]'s 8 lanes (exact: integer adds in any order)
__attribute__((target("avx2,fma")))
static inline __m256i sum8(const __m256i* a) {
  const __m256i u0 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]),
                                       _mm256_hadd_epi32(a[2], a[3]));
  const __m256i u1 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[4], a[5]),
                                       _mm256_hadd_epi32(a[6], a[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20),
                          _mm256_permute2x128_si256(u0, u1, 0x31));
}

__attribute__((target("avx2,fma")))
void w1a8_gemm_avx2(const int8_t* v, int64_t M, const uint8_t* w, int64_t KB,
                    const float* scale, const float* xscale, int64_t K, int64_t gs, int64_t n0,
                    int64_t n1, float* y, int64_t N) {
  const int64_t G = K / gs;
  std::vector<int8_t> ws(GR * gs);  // rows past the block's end stay 0: their products are 0
  const __m256i one8 = _mm256_set1_epi8(1), one16 = _mm256_set1_epi16(1);
  for (int64_t nb = n0; nb < n1; nb += GR) {
    const int64_t nn = std::min(GR, n1 - nb);
    float sc[GR] = {};
    for (int64_t g = 0; g < G; ++g) {
      std::fill(ws.begin(), ws.end(), int8_t(0));
      for (int64_t r = 0; r < nn; ++r) {
        sc[r] = scale[(nb + r) * G + g];
        for (int64_t k = 0; k < gs; k += 32)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(ws.data() + r * gs + k),
                              expand_signs(w + (nb + r) * KB + ((g * gs + k) >> 3)));
      }
      const __m256 scv = _mm256_loadu_ps(sc);
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* xr = v + m * K + g * gs;
        __m256i a32[GR];
        for (int64_t r = 0; r < GR; ++r) a32[r] = _mm256_setzero_si256();
        for (int64_t k0 = 0; k0 < gs; k0 += 32 * I16_STEPS) {
          const int64_t k1 = std::min(gs, k0 + 32 * I16_STEPS);
          __m256i a16[GR];
          for (int64_t r = 0; r < GR; ++r) a16[r] = _mm256_setzero_si256();
          for (int64_t k = k0; k < k1; k += 32) {
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + k));
            for (int64_t r = 0; r < GR; ++r) {
              const __m256i wv = _mm256_loadu_si256(
                  reinterpret_cast<const __m256i*>(ws.data() + r * gs + k));
              a16[r] = _mm256_add_epi16(
                  a16[r], _mm256_maddubs_epi16(one8, _mm256_sign_epi8(xv, wv)));
            }
          }
          for (int64_t r = 0; r < GR; ++r)
            a32[r] = _mm256_add_epi32(a32[r], _mm256_madd_epi16(a16[r], one16));
        }
        // the row kernels' epilogue, 8 outputs at once: out = fma(scale, float(sum), out),
        // and after the last group out *= the row's activation scale
        float buf[GR] = {};
        float* out = nn == GR ? y + m * N + nb : buf;
        if (nn < GR) std::memcpy(buf, y + m * N + nb, nn * sizeof(float));
        __m256 o = _mm256_fmadd_ps(scv, _mm256_cvtepi32_ps(sum8(a32)), _mm256_loadu_ps(out));
        if (g == G - 1) o = _mm256_mul_ps(o, _mm256_set1_ps(xscale[m]));
        _mm256_storeu_ps(out, o);
        if (nn < GR) std::memcpy(y + m * N + nb, buf, nn * sizeof(float));
      }
    }
  }
}

at::Tensor w1a8_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                     int64_t gs, const c10::optional<at::Tensor>& bias, bool per_token,
                     int64_t isa) {
  const char* op = "qdsl_binary.w1a8_gemm";
  check_w1(op, x, packed, scale, gs);
  TORCH_CHECK(x.size(0) > 0, op, ": shape mismatch");
  TORCH_CHECK(isa >= ISA_AVX2 && gs % 32 == 0, op, ": needs AVX2 and groups of a multiple "
              "of 32 weights (got isa ", isa, ", group size ", gs, "); use w1a8_linear");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), KB = packed.size(1);
  std::vector<int8_t> v(M * K);
  std::vector<float> xscale(M);
  quantize_rows<int8_t>(x.data_ptr<float>(), M, K, per_token, true, v.data(), xscale.data());
  at::Tensor y = at::zeros({M, N}, x.options());
  const uint8_t* pp = packed.data_ptr<uint8_t>(); const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(GR, grain(KB) / GR * GR), [&](int64_t n0, int64_t n1) {
    w1a8_gemm_avx2(v.data(), M, pp, KB, sp, xscale.data(), K, gs, n0, n1, yp, N);
  });
  add_bias(op, y, bias);
  return y;
}

}  // namespace

TORCH_LIBRARY(qdsl_binary, m) {
  m.def("w1_linear(Tensor x, Tensor packed, Tensor scale, int gs, Tensor? bias, int isa) -> Tensor");
  m.def("w1a8_linear(Tensor x, Tensor packed, Tensor scale, int gs, Tensor? bias, bool per_token, "
        "bool symmetric, int isa) -> Tensor");
  m.def("w1a8_gemm(Tensor x, Tensor packed, Tensor scale, int gs, Tensor? bias, bool per_token, "
        "int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(qdsl_binary, CPU, m) {
  m.impl("w1_linear", &w1_linear);
  m.impl("w1a8_linear", &w1a8_linear);
  m.impl("w1a8_gemm", &w1a8_gemm);
}
