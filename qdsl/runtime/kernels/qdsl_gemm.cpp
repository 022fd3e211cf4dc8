// qdsl's packed int8 GEMM for prefill (AVX2; built with qdsl_kernels.cpp by cext.py).
//
// The w8a8 row kernels of qdsl_kernels.cpp take one dot product per (row, column) and
// reduce it horizontally: fine for a GEMV, slow for 512 rows. This one is the classic
// register-tiled GEMM: the weight is packed once (w8a8_pack) into panels of 16 columns,
// two K positions interleaved per column ([N/16, K/2, 16, 2] int8); a pair of int16
// activations (x[m, k], x[m, k+1]) is broadcast and vpmaddwd'ed against the panel widened
// to int16, accumulating a 6 x 16 int32 tile in 12 registers. int16 products summed in
// pairs into int32 are exact (|x| <= 128, |w| <= 127), so the result is the integer maths.
// Cache blocking: 96 activation rows (int16, <= 300 KB at K = 1536) against every panel
// of a thread's columns; threads split the panels (at::parallel_for).
//
// Ops:
//   w8a8_pack(w int8 [N, K]) -> int8 [ceil(N/16), ceil(K/2), 16, 2] (zero padded)
//   w8a8_gemm(xq int8 [M, K], x_scale[M], x_zp int32[M]?, packed, N, w_scale[N],
//             w_rowsum int32[N]?, bias?, isa)   the same result as w8a8_linear;
//             isa 0: generic C++ tile, >= 1: AVX2
#include "qdsl_common.h"
#include <ATen/Parallel.h>

namespace {

constexpr int64_t GMR = 6, GNR = 16, GMC = 96;

at::Tensor w8a8_pack(const at::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2, "w8a8_pack: w must be int8 [N, K]");
  at::Tensor wc = w.contiguous();
  const int64_t N = wc.size(0), K = wc.size(1), NT = (N + GNR - 1) / GNR, KP = (K + 1) / 2;
  at::Tensor p = at::zeros({NT, KP, GNR, 2}, wc.options());
  const int8_t* wp = wc.data_ptr<int8_t>(); int8_t* pp = p.data_ptr<int8_t>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k)
      pp[(((n / GNR) * KP + k / 2) * GNR + n % GNR) * 2 + k % 2] = wp[n * K + k];
  return p;
}

void tile_generic(const int16_t* x, int64_t ldx, int64_t mm, const int8_t* panel, int64_t KP,
                  int32_t* out, int64_t ldo, int64_t nn) {
  for (int64_t m = 0; m < mm; ++m)
    for (int64_t c = 0; c < nn; ++c) {
      int32_t s = 0;
      for (int64_t p = 0; p < KP; ++p)
        s += int32_t(x[m * ldx + 2 * p]) * panel[(p * GNR + c) * 2] +
             int32_t(x[m * ldx + 2 * p + 1]) * panel[(p * GNR + c) * 2 + 1];
      out[m * ldo + c] = s;
    }
}

__attribute__((target("avx2")))
void tile_avx2(const int16_t* x, int64_t ldx, int64_t mm, const int8_t* panel, int64_t KP,
               int32_t* out, int64_t ldo, int64_t nn) {
  __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00,
          a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
  const int32_t* xr[GMR];   // rows past mm repeat the last one (results dropped)
  for (int64_t m = 0; m < GMR; ++m)
    xr[m] = reinterpret_cast<const int32_t*>(x + std::min(m, mm - 1) * ldx);
  for (int64_t p = 0; p < KP; ++p) {
    __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + p * GNR * 2));
    __m256i w0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(raw));
    __m256i w1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(raw, 1));
    __m256i b;
#define QDSL_GEMM_ROW(R)                                                  \
    b = _mm256_set1_epi32(xr[R][p]);                                      \
    a##R##0 = _mm256_add_epi32(a##R##0, _mm256_madd_epi16(b, w0));        \
    a##R##1 = _mm256_add_epi32(a##R##1, _mm256_madd_epi16(b, w1));
    QDSL_GEMM_ROW(0) QDSL_GEMM_ROW(1) QDSL_GEMM_ROW(2)
    QDSL_GEMM_ROW(3) QDSL_GEMM_ROW(4) QDSL_GEMM_ROW(5)
#undef QDSL_GEMM_ROW
  }
  alignas(32) int32_t buf[GMR][GNR];
  const __m256i acc[GMR][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}, {a40, a41},
                               {a50, a51}};
  for (int64_t m = 0; m < GMR; ++m) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(buf[m]), acc[m][0]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(buf[m] + 8), acc[m][1]);
  }
  for (int64_t m = 0; m < mm; ++m) std::copy(buf[m], buf[m] + nn, out + m * ldo);
}

at::Tensor w8a8_gemm(const at::Tensor& xq, const at::Tensor& x_scale,
                     const c10::optional<at::Tensor>& x_zp, const at::Tensor& packed, int64_t N,
                     const at::Tensor& w_scale, const c10::optional<at::Tensor>& w_rowsum,
                     const c10::optional<at::Tensor>& bias, int64_t isa) {
  TORCH_CHECK(xq.scalar_type() == at::kChar && xq.dim() == 2 && packed.scalar_type() == at::kChar &&
              packed.dim() == 4 && packed.is_contiguous(), "w8a8_gemm: xq int8 [M, K], packed int8 4-d");
  const int64_t M = xq.size(0), K = xq.size(1), NT = packed.size(0), KP = packed.size(1);
  TORCH_CHECK(KP == (K + 1) / 2 && NT == (N + GNR - 1) / GNR && w_scale.numel() == N &&
              x_scale.numel() == M, "qdsl_kernels.w8a8_gemm: shape mismatch");
  at::Tensor x16 = at::zeros({M, 2 * KP}, xq.options().dtype(at::kShort));
  x16.narrow(1, 0, K).copy_(xq);
  at::Tensor acc = at::empty({M, N}, xq.options().dtype(at::kInt));
  const int16_t* xp = x16.data_ptr<int16_t>(); const int8_t* pp = packed.data_ptr<int8_t>();
  int32_t* ap = acc.data_ptr<int32_t>();
  const auto tile = pick_isa(isa, tile_generic, tile_avx2);
  at::parallel_for(0, NT, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t mb = 0; mb < M; mb += GMC) {
      const int64_t me = std::min(M, mb + GMC);
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t m = mb; m < me; m += GMR)
          tile(xp + m * 2 * KP, 2 * KP, std::min(GMR, me - m), pp + t * KP * GNR * 2, KP,
               ap + m * N + t * GNR, N, std::min(GNR, N - t * GNR));
    }
  });
  if (x_zp.has_value() && x_zp->defined()) {
    TORCH_CHECK(w_rowsum.has_value() && w_rowsum->defined(), "x_zp needs w_rowsum");
    acc.sub_(x_zp->unsqueeze(1) * w_rowsum->unsqueeze(0));
  }
  at::Tensor y = acc.to(at::kFloat).mul_(x_scale.reshape({M, 1})).mul_(w_scale);
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qdsl_kernels, m) {
  m.def("w8a8_pack(Tensor w) -> Tensor");
  m.def("w8a8_gemm(Tensor xq, Tensor x_scale, Tensor? x_zp, Tensor packed, int N, "
        "Tensor w_scale, Tensor? w_rowsum, Tensor? bias, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(qdsl_kernels, CPU, m) {
  m.impl("w8a8_pack", &w8a8_pack);
  m.impl("w8a8_gemm", &w8a8_gemm);
}
