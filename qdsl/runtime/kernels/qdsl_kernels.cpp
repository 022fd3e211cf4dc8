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
//               the integer product accumulated exactly in int32
//   w4_linear(x, packed uint8 [N, K/2], scale[N, K/gs], gs, bias?, isa)
//               codes u in [0, 15] two per byte, low nibble first; w = (u - 8) * scale
#include "qdsl_common.h"
#include <ATen/Parallel.h>

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

__attribute__((target("avx2,fma")))
void w8_rows_avx2(const float* x, int64_t M, const int8_t* w, int64_t K,
                  int64_t n0, int64_t n1, float* y, int64_t N) {
  const int64_t K8 = K & ~int64_t(7);
  for (int64_t mb = 0; mb < M; mb += MB) {
    const int64_t mm = std::min(MB, M - mb);
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* wr = w + n * K;
      __m256 a[MB] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                      _mm256_setzero_ps()};
      for (int64_t k = 0; k < K8; k += 8) {
        __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + k));
        __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
        for (int64_t m = 0; m < mm; ++m)
          a[m] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + (mb + m) * K + k), a[m]);
      }
      for (int64_t m = 0; m < mm; ++m) {
        float s = hsum256(a[m]);
        const float* xr = x + (mb + m) * K;
        for (int64_t k = K8; k < K; ++k) s += xr[k] * float(wr[k]);
        y[(mb + m) * N + n] = s;
      }
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
void w8_rows_avx512(const float* x, int64_t M, const int8_t* w, int64_t K,
                    int64_t n0, int64_t n1, float* y, int64_t N) {
  const int64_t K16 = K & ~int64_t(15);
  for (int64_t mb = 0; mb < M; mb += MB) {
    const int64_t mm = std::min(MB, M - mb);
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* wr = w + n * K;
      __m512 a[MB] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                      _mm512_setzero_ps()};
      for (int64_t k = 0; k < K16; k += 16) {
        __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k));
        __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
        for (int64_t m = 0; m < mm; ++m)
          a[m] = _mm512_fmadd_ps(wf, _mm512_loadu_ps(x + (mb + m) * K + k), a[m]);
      }
      for (int64_t m = 0; m < mm; ++m) {
        float s = _mm512_reduce_add_ps(a[m]);
        const float* xr = x + (mb + m) * K;
        for (int64_t k = K16; k < K; ++k) s += xr[k] * float(wr[k]);
        y[(mb + m) * N + n] = s;
      }
    }
  }
}

// ---------------------------------------------------------------- w8a8 (exact int32)
// x is widened to int16 once ([M, K]); each int8 weight chunk is widened and
// multiplied in int16 pairs accumulated in int32 (madd / VNNI dpwssd): exact.

void w8a8_rows_generic(const int16_t* x, int64_t M, const int8_t* w, int64_t K,
                       int64_t n0, int64_t n1, int32_t* acc, int64_t N) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      int32_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += int32_t(x[m * K + k]) * int32_t(w[n * K + k]);
      acc[m * N + n] = s;
    }
}

__attribute__((target("avx2")))
void w8a8_rows_avx2(const int16_t* x, int64_t M, const int8_t* w, int64_t K,
                    int64_t n0, int64_t n1, int32_t* acc, int64_t N) {
  const int64_t K16 = K & ~int64_t(15);
  for (int64_t mb = 0; mb < M; mb += MB) {
    const int64_t mm = std::min(MB, M - mb);
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* wr = w + n * K;
      __m256i a[MB] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                       _mm256_setzero_si256()};
      for (int64_t k = 0; k < K16; k += 16) {
        __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k)));
        for (int64_t m = 0; m < mm; ++m) {
          __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + (mb + m) * K + k));
          a[m] = _mm256_add_epi32(a[m], _mm256_madd_epi16(xv, wv));
        }
      }
      for (int64_t m = 0; m < mm; ++m) {
        int32_t s = hsum256i(a[m]);
        for (int64_t k = K16; k < K; ++k) s += int32_t(x[(mb + m) * K + k]) * int32_t(wr[k]);
        acc[(mb + m) * N + n] = s;
      }
    }
  }
}

// one body, two targets: with VNNI the compiler may (and we do) fuse madd + add into
// vpdpwssd, so the plain AVX-512 path must be compiled without it
#define QDSL_W8A8_AVX512_BODY(ACC)                                                          \
  const int64_t K32 = K & ~int64_t(31);                                                     \
  for (int64_t mb = 0; mb < M; mb += MB) {                                                  \
    const int64_t mm = std::min(MB, M - mb);                                                \
    for (int64_t n = n0; n < n1; ++n) {                                                     \
      const int8_t* wr = w + n * K;                                                         \
      __m512i a[MB] = {_mm512_setzero_si512(), _mm512_setzero_si512(),                      \
                       _mm512_setzero_si512(), _mm512_setzero_si512()};                     \
      for (int64_t k = 0; k < K32; k += 32) {                                               \
        __m512i wv = _mm512_cvtepi8_epi16(                                                  \
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k)));                  \
        for (int64_t m = 0; m < mm; ++m) {                                                  \
          __m512i xv = _mm512_loadu_si512(x + (mb + m) * K + k);                            \
          a[m] = ACC(a[m], xv, wv);                                                         \
        }                                                                                   \
      }                                                                                     \
      for (int64_t m = 0; m < mm; ++m) {                                                    \
        int32_t s = _mm512_reduce_add_epi32(a[m]);                                          \
        for (int64_t k = K32; k < K; ++k) s += int32_t(x[(mb + m) * K + k]) * int32_t(wr[k]); \
        acc[(mb + m) * N + n] = s;                                                          \
      }                                                                                     \
    }                                                                                       \
  }

#define QDSL_MADD_ADD(a, x, w) _mm512_add_epi32(a, _mm512_madd_epi16(x, w))

__attribute__((target("avx512f,avx512bw,avx512vl")))
void w8a8_rows_avx512(const int16_t* x, int64_t M, const int8_t* w, int64_t K,
                      int64_t n0, int64_t n1, int32_t* acc, int64_t N) {
  QDSL_W8A8_AVX512_BODY(QDSL_MADD_ADD)
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
void w8a8_rows_vnni(const int16_t* x, int64_t M, const int8_t* w, int64_t K,
                    int64_t n0, int64_t n1, int32_t* acc, int64_t N) {
  QDSL_W8A8_AVX512_BODY(_mm512_dpwssd_epi32)
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

__attribute__((target("avx2,fma")))
void w4_rows_avx2(const float* x, int64_t M, const uint8_t* p, const float* sc, int64_t K,
                  int64_t gs, int64_t n0, int64_t n1, float* y, int64_t N) {
  const int64_t G = K / gs, KB = K / 2;   // gs % 16 == 0 (checked by the caller)
  const __m128i lo4 = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
  for (int64_t mb = 0; mb < M; mb += MB) {
    const int64_t mm = std::min(MB, M - mb);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* pr = p + n * KB;
      __m256 t[MB] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                      _mm256_setzero_ps()};
      for (int64_t g = 0; g < G; ++g) {
        __m256 a[MB] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                        _mm256_setzero_ps()};
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
          __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(pr + k / 2));
          __m128i v = _mm_unpacklo_epi8(_mm_and_si128(b, lo4),
                                        _mm_and_si128(_mm_srli_epi16(b, 4), lo4));
          v = _mm_sub_epi8(v, eight);                               // 16 codes, in order
          __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
          __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
          for (int64_t m = 0; m < mm; ++m) {
            const float* xr = x + (mb + m) * K + k;
            a[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), a[m]);
            a[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), a[m]);
          }
        }
        __m256 s = _mm256_set1_ps(sc[n * G + g]);
        for (int64_t m = 0; m < mm; ++m) t[m] = _mm256_fmadd_ps(a[m], s, t[m]);
      }
      for (int64_t m = 0; m < mm; ++m) y[(mb + m) * N + n] = hsum256(t[m]);
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
void w4_rows_avx512(const float* x, int64_t M, const uint8_t* p, const float* sc, int64_t K,
                    int64_t gs, int64_t n0, int64_t n1, float* y, int64_t N) {
  const int64_t G = K / gs, KB = K / 2;   // gs % 32 == 0 (checked by the caller)
  const __m128i lo4 = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
  for (int64_t mb = 0; mb < M; mb += MB) {
    const int64_t mm = std::min(MB, M - mb);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* pr = p + n * KB;
      __m512 t[MB] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                      _mm512_setzero_ps()};
      for (int64_t g = 0; g < G; ++g) {
        __m512 a[MB] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                        _mm512_setzero_ps()};
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
          __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(pr + k / 2));
          __m128i l = _mm_and_si128(b, lo4), h = _mm_and_si128(_mm_srli_epi16(b, 4), lo4);
          __m128i v0 = _mm_sub_epi8(_mm_unpacklo_epi8(l, h), eight);
          __m128i v1 = _mm_sub_epi8(_mm_unpackhi_epi8(l, h), eight);
          __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v0));
          __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v1));
          for (int64_t m = 0; m < mm; ++m) {
            const float* xr = x + (mb + m) * K + k;
            a[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), a[m]);
            a[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), a[m]);
          }
        }
        __m512 s = _mm512_set1_ps(sc[n * G + g]);
        for (int64_t m = 0; m < mm; ++m) t[m] = _mm512_fmadd_ps(a[m], s, t[m]);
      }
      for (int64_t m = 0; m < mm; ++m) y[(mb + m) * N + n] = _mm512_reduce_add_ps(t[m]);
    }
  }
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

at::Tensor w8a8_linear(const at::Tensor& xq, const at::Tensor& x_scale,
                       const c10::optional<at::Tensor>& x_zp, const at::Tensor& w,
                       const at::Tensor& w_scale, const c10::optional<at::Tensor>& w_rowsum,
                       const c10::optional<at::Tensor>& bias, int64_t isa) {
  check(xq, at::kChar, 2, "xq"); check(w, at::kChar, 2, "w");
  check(w_scale, at::kFloat, 1, "w_scale"); check(x_scale, at::kFloat, 1, "x_scale");
  const int64_t M = xq.size(0), K = xq.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K && w_scale.size(0) == N && x_scale.size(0) == M,
              "qdsl_kernels.w8a8_linear: shape mismatch");
  at::Tensor x16 = xq.to(at::kShort);
  at::Tensor acc = at::empty({M, N}, xq.options().dtype(at::kInt));
  const int16_t* xp = x16.data_ptr<int16_t>(); const int8_t* wp = w.data_ptr<int8_t>();
  int32_t* ap = acc.data_ptr<int32_t>();
  const auto rows = pick_isa(isa, w8a8_rows_generic, w8a8_rows_avx2, w8a8_rows_avx512,
                             w8a8_rows_vnni);
  at::parallel_for(0, N, grain(K), [&](int64_t n0, int64_t n1) {
    rows(xp, M, wp, K, n0, n1, ap, N);
  });
  if (x_zp.has_value() && x_zp->defined()) {
    TORCH_CHECK(w_rowsum.has_value() && w_rowsum->defined(), "x_zp needs w_rowsum");
    check(*x_zp, at::kInt, 1, "x_zp"); check(*w_rowsum, at::kInt, 1, "w_rowsum");
    acc.sub_(x_zp->unsqueeze(1) * w_rowsum->unsqueeze(0));
  }
  at::Tensor y = acc.to(at::kFloat).mul_(x_scale.unsqueeze(1)).mul_(w_scale);
  epilogue_bias(y, bias);
  return y;
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
  const auto rows = pick_isa(isa, w4_rows_generic, w4_rows_avx2, w4_rows_avx512);
  at::parallel_for(0, N, grain(K / 2), [&](int64_t n0, int64_t n1) {
    rows(xp, M, pp, sp, K, gs, n0, n1, yp, N);
  });
  epilogue_bias(y, bias);
  return y;
}

}  // namespace

TORCH_LIBRARY(qdsl_kernels, m) {
  m.def("w8_linear(Tensor x, Tensor w, Tensor w_scale, Tensor? bias, int isa) -> Tensor");
  m.def("w8a8_linear(Tensor xq, Tensor x_scale, Tensor? x_zp, Tensor w, Tensor w_scale, "
        "Tensor? w_rowsum, Tensor? bias, int isa) -> Tensor");
  m.def("w4_linear(Tensor x, Tensor packed, Tensor scale, int gs, Tensor? bias, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(qdsl_kernels, CPU, m) {
  m.impl("w8_linear", &w8_linear);
  m.impl("w8a8_linear", &w8a8_linear);
  m.impl("w4_linear", &w4_linear);
}
