// Fake quantization of float32 activations (`--lower fake`, the inner loop of every sweep):
// one pass, no gradient mask, AVX-512 / AVX2 / scalar per the `isa` argument.
//
//   y = (clamp(nearbyint(x * (1 / s)) + zp, qmin, qmax) - zp) * s
//
// in float32, in exactly torch's order (fake_quantize_per_tensor_affine and
// _per_channel_affine on the CPU: the reciprocal of the scale, a rounding to nearest
// even, the zero point added after it, the clamp, the zero point taken off, one
// multiplication), so the results are bit-identical to qdsl's fake_quantize (tests). A NaN
// goes to qmin, as torch's per-tensor kernel sends it (max(q, qmin) returns qmin for a
// NaN q: the operand order below is part of the contract).
//
// fake_quant: frozen parameters, one pair for the tensor (axis -1), one per row of the
// last dimension (axis 0: per token) or one per column (axis 1: a PEG scale vector [d]).
// dynamic_fake_quant: the range of the tensor itself (min-max over the tensor or each
// row), the parameters as quant/primitives.py's choose_qparams computes them
// (qdsl_common.h's qparams, shared with quantize_rows), then the same pass: what
// DynamicFakeQuant does in four torch calls, in one.

#include "qdsl_common.h"
#include <ATen/Parallel.h>

namespace {

// one (scale, zero point) over n values
using FqSpan = void (*)(const float*, float*, int64_t, float, float, float, float);

void fq_span_generic(const float* x, float* y, int64_t n, float s, float zp, float qmin,
                     float qmax) {
  const float inv = 1.f / s;
  for (int64_t i = 0; i < n; ++i) {
    const float q = std::nearbyint(x[i] * inv) + zp;
    y[i] = (std::fmin(std::fmax(q, qmin), qmax) - zp) * s;   // NaN q: fmax gives qmin
  }
}

__attribute__((target("avx2")))
void fq_span_avx2(const float* x, float* y, int64_t n, float s, float zp, float qmin,
                  float qmax) {
  const float inv = 1.f / s;
  const __m256 vi = _mm256_set1_ps(inv), vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(zp),
               lo = _mm256_set1_ps(qmin), hi = _mm256_set1_ps(qmax);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 q = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vi),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(q, vz), lo), hi);
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_sub_ps(q, vz), vs));
  }
  fq_span_generic(x + i, y + i, n - i, s, zp, qmin, qmax);
}

__attribute__((target("avx512f")))
void fq_span_avx512(const float* x, float* y, int64_t n, float s, float zp, float qmin,
                    float qmax) {
  const float inv = 1.f / s;
  const __m512 vi = _mm512_set1_ps(inv), vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(zp),
               lo = _mm512_set1_ps(qmin), hi = _mm512_set1_ps(qmax);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), vi),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(q, vz), lo), hi);
    _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_sub_ps(q, vz), vs));
  }
  if (i < n) {                                   // the tail under a mask, same maths
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), vi),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(q, vz), lo), hi);
    _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(_mm512_sub_ps(q, vz), vs));
  }
}

// one (scale, zero point) per column of a row of d values
using FqCols = void (*)(const float*, float*, int64_t, const float*, const float*,
                        const float*, float, float);

void fq_cols_generic(const float* x, float* y, int64_t d, const float* s, const float* inv,
                     const float* zp, float qmin, float qmax) {
  for (int64_t i = 0; i < d; ++i) {
    const float q = std::nearbyint(x[i] * inv[i]) + zp[i];
    y[i] = (std::fmin(std::fmax(q, qmin), qmax) - zp[i]) * s[i];
  }
}

__attribute__((target("avx2")))
void fq_cols_avx2(const float* x, float* y, int64_t d, const float* s, const float* inv,
                  const float* zp, float qmin, float qmax) {
  const __m256 lo = _mm256_set1_ps(qmin), hi = _mm256_set1_ps(qmax);
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    const __m256 vz = _mm256_loadu_ps(zp + i);
    __m256 q = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(inv + i)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(q, vz), lo), hi);
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_sub_ps(q, vz), _mm256_loadu_ps(s + i)));
  }
  fq_cols_generic(x + i, y + i, d - i, s + i, inv + i, zp + i, qmin, qmax);
}

__attribute__((target("avx512f")))
void fq_cols_avx512(const float* x, float* y, int64_t d, const float* s, const float* inv,
                    const float* zp, float qmin, float qmax) {
  const __m512 lo = _mm512_set1_ps(qmin), hi = _mm512_set1_ps(qmax);
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    const __m512 vz = _mm512_loadu_ps(zp + i);
    __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i),
                                                  _mm512_loadu_ps(inv + i)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(q, vz), lo), hi);
    _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_sub_ps(q, vz), _mm512_loadu_ps(s + i)));
  }
  fq_cols_generic(x + i, y + i, d - i, s + i, inv + i, zp + i, qmin, qmax);
}

// min and max of n values (NaNs are not ordered: a NaN row gets a finite range here
// where torch's aminmax would give NaN; its output is NaN-free garbage either way)
using MinMax = void (*)(const float*, int64_t, float*, float*);

void minmax_generic(const float* x, int64_t n, float* lo, float* hi) {
  float a = x[0], b = x[0];
  for (int64_t i = 1; i < n; ++i) { a = std::min(a, x[i]); b = std::max(b, x[i]); }
  *lo = a; *hi = b;
}

__attribute__((target("avx2")))
void minmax_avx2(const float* x, int64_t n, float* lo, float* hi) {
  if (n < 8) return minmax_generic(x, n, lo, hi);
  __m256 a = _mm256_loadu_ps(x), b = a;
  int64_t i = 8;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    a = _mm256_min_ps(a, v); b = _mm256_max_ps(b, v);
  }
  alignas(32) float ta[8], tb[8];
  _mm256_store_ps(ta, a); _mm256_store_ps(tb, b);
  float ra = ta[0], rb = tb[0];
  for (int k = 1; k < 8; ++k) { ra = std::min(ra, ta[k]); rb = std::max(rb, tb[k]); }
  for (; i < n; ++i) { ra = std::min(ra, x[i]); rb = std::max(rb, x[i]); }
  *lo = ra; *hi = rb;
}

__attribute__((target("avx512f")))
void minmax_avx512(const float* x, int64_t n, float* lo, float* hi) {
  if (n < 16) return minmax_avx2(x, n, lo, hi);
  __m512 a = _mm512_loadu_ps(x), b = a;
  int64_t i = 16;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    a = _mm512_min_ps(a, v); b = _mm512_max_ps(b, v);
  }
  float ra = _mm512_reduce_min_ps(a), rb = _mm512_reduce_max_ps(b);
  for (; i < n; ++i) { ra = std::min(ra, x[i]); rb = std::max(rb, x[i]); }
  *lo = ra; *hi = rb;
}

constexpr int64_t kSpanGrain = 1 << 14;   // values per parallel chunk (per-tensor passes)

at::Tensor checked_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 1,
              op, ": x must be a float32 CPU tensor of at least 1 dim, got ",
              x.scalar_type(), " ", x.sizes());
  return x.contiguous();
}

at::Tensor fake_quant(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                      int64_t axis, int64_t qmin, int64_t qmax, int64_t isa) {
  const char* op = "qdsl_kernels.fake_quant";
  const at::Tensor xc = checked_input(x, op);
  const int64_t d = xc.size(-1), n = xc.numel(), rows = d ? n / d : 0;
  const at::Tensor sc = scale.to(at::kFloat).contiguous().reshape(-1);
  const at::Tensor zc = zero_point.to(at::kFloat).contiguous().reshape(-1);
  const int64_t want = axis < 0 ? 1 : axis == 0 ? rows : d;
  TORCH_CHECK(axis >= -1 && axis <= 1 && sc.numel() == want && zc.numel() == want &&
              qmin < qmax, op, ": axis ", axis, " wants ", want, " scales and zero points "
              "and qmin < qmax, got ", sc.numel(), ", ", zc.numel(), " and [", qmin, ", ",
              qmax, "]");
  at::Tensor y = at::empty_like(xc);
  if (n == 0) return y;
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* sp = sc.data_ptr<float>();
  const float* zpp = zc.data_ptr<float>();
  const float lo = float(qmin), hi = float(qmax);
  if (axis == 1) {
    std::vector<float> inv(d);
    for (int64_t i = 0; i < d; ++i) inv[i] = 1.f / sp[i];
    const FqCols cols = pick_isa<FqCols>(isa, fq_cols_generic, fq_cols_avx2, fq_cols_avx512);
    at::parallel_for(0, rows, std::max<int64_t>(1, kSpanGrain / std::max<int64_t>(d, 1)),
                     [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) cols(xp + r * d, yp + r * d, d, sp, inv.data(), zpp, lo, hi);
    });
    return y;
  }
  const FqSpan span = pick_isa<FqSpan>(isa, fq_span_generic, fq_span_avx2, fq_span_avx512);
  if (axis < 0) {
    at::parallel_for(0, n, kSpanGrain, [&](int64_t i0, int64_t i1) {
      span(xp + i0, yp + i0, i1 - i0, sp[0], zpp[0], lo, hi);
    });
  } else {
    at::parallel_for(0, rows, std::max<int64_t>(1, kSpanGrain / std::max<int64_t>(d, 1)),
                     [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) span(xp + r * d, yp + r * d, d, sp[r], zpp[r], lo, hi);
    });
  }
  return y;
}

at::Tensor dynamic_fake_quant(const at::Tensor& x, bool per_token, int64_t qmin, int64_t qmax,
                              bool symmetric, int64_t isa) {
  const char* op = "qdsl_kernels.dynamic_fake_quant";
  const at::Tensor xc = checked_input(x, op);
  TORCH_CHECK(qmin < qmax && (!symmetric || qmax > 0), op, ": bad grid [", qmin, ", ", qmax, "]");
  const int64_t d = xc.size(-1), n = xc.numel(), rows = d ? n / d : 0;
  at::Tensor y = at::empty_like(xc);
  if (n == 0) return y;
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float lo = float(qmin), hi = float(qmax);
  const FqSpan span = pick_isa<FqSpan>(isa, fq_span_generic, fq_span_avx2, fq_span_avx512);
  const MinMax minmax = pick_isa<MinMax>(isa, minmax_generic, minmax_avx2, minmax_avx512);
  if (per_token) {              // a row's range, then its pass while the row is in cache
    at::parallel_for(0, rows, std::max<int64_t>(1, kSpanGrain / std::max<int64_t>(d, 1)),
                     [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float a, b, s, zp;
        minmax(xp + r * d, d, &a, &b);
        qparams(a, b, lo, hi, symmetric, &s, &zp);
        span(xp + r * d, yp + r * d, d, s, zp, lo, hi);
      }
    });
    return y;
  }
  const int64_t chunks = (n + kSpanGrain - 1) / kSpanGrain;   // the range over every chunk
  std::vector<float> ca(chunks), cb(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * kSpanGrain;
      minmax(xp + i0, std::min(kSpanGrain, n - i0), &ca[c], &cb[c]);
    }
  });
  float a = ca[0], b = cb[0], s, zp;
  for (int64_t c = 1; c < chunks; ++c) { a = std::min(a, ca[c]); b = std::max(b, cb[c]); }
  qparams(a, b, lo, hi, symmetric, &s, &zp);
  at::parallel_for(0, n, kSpanGrain, [&](int64_t i0, int64_t i1) {
    span(xp + i0, yp + i0, i1 - i0, s, zp, lo, hi);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qdsl_kernels, m) {
  m.def("fake_quant(Tensor x, Tensor scale, Tensor zero_point, int axis, int qmin, int qmax, "
        "int isa) -> Tensor");
  m.def("dynamic_fake_quant(Tensor x, bool per_token, int qmin, int qmax, bool symmetric, "
        "int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(qdsl_kernels, CPU, m) {
  m.impl("fake_quant", &fake_quant);
  m.impl("dynamic_fake_quant", &dynamic_fake_quant);
}
