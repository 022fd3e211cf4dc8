// The instruction ceilings of an AVX2 GEMM's inner loop on this CPU, registers only (no
// loads, independent accumulators, best of 7): fp32 FMA (vfmadd231ps, 8 MACs), int16
// pairs (vpmaddwd + vpaddd, 16 MACs: qdsl_w8a8's exact path) and int8 without VNNI
// (vpmaddubsw u8 x s8 -> s16 pairs, vpmaddwd by ones -> s32, vpaddd: 32 MACs, fbgemm's).
// An int8 GEMM cannot beat fp32 by more than the ratio of its path's ceiling to FMA's.
//
//   g++ -O2 -mavx2 -mfma -o /tmp/avx2_mac_ceiling tools/avx2_mac_ceiling.cpp
//   /tmp/avx2_mac_ceiling [ITERATIONS]        (default 2e8; docs/performance.md)
//
// The loops run one after another: on a shared machine run it several times and read
// the ratios of one run, not the absolute rates.
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <algorithm>

static double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

__attribute__((noinline)) float fp32(long iters) {
  __m256 b = _mm256_set1_ps(0.9999f);
  __m256 a0 = _mm256_set1_ps(1.01f), a1 = _mm256_set1_ps(1.02f), a2 = _mm256_set1_ps(1.03f),
         a3 = _mm256_set1_ps(1.04f), a4 = _mm256_set1_ps(1.05f);
  __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0,
         c8 = c0, c9 = c0;
  for (long i = 0; i < iters; ++i) {
    c0 = _mm256_fmadd_ps(a0, b, c0); c1 = _mm256_fmadd_ps(a1, b, c1);
    c2 = _mm256_fmadd_ps(a2, b, c2); c3 = _mm256_fmadd_ps(a3, b, c3);
    c4 = _mm256_fmadd_ps(a4, b, c4); c5 = _mm256_fmadd_ps(a0, a1, c5);
    c6 = _mm256_fmadd_ps(a1, a2, c6); c7 = _mm256_fmadd_ps(a2, a3, c7);
    c8 = _mm256_fmadd_ps(a3, a4, c8); c9 = _mm256_fmadd_ps(a4, a0, c9);
    __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(b));
  }
  __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3)),
                           _mm256_add_ps(_mm256_add_ps(c4, c5), _mm256_add_ps(c6, c7)));
  s = _mm256_add_ps(s, _mm256_add_ps(c8, c9));
  return _mm256_cvtss_f32(s);
}  // 10 x 8 = 80 MACs per iteration

__attribute__((noinline)) int int8(long iters) {
  __m256i a0 = _mm256_set1_epi8(3), a1 = _mm256_set1_epi8(4), a2 = _mm256_set1_epi8(5),
          a3 = _mm256_set1_epi8(6), a4 = _mm256_set1_epi8(7), b = _mm256_set1_epi8(-2),
          one = _mm256_set1_epi16(1);
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0;
  for (long i = 0; i < iters; ++i) {
    c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(_mm256_maddubs_epi16(a0, b), one));
    c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(_mm256_maddubs_epi16(a1, b), one));
    c2 = _mm256_add_epi32(c2, _mm256_madd_epi16(_mm256_maddubs_epi16(a2, b), one));
    c3 = _mm256_add_epi32(c3, _mm256_madd_epi16(_mm256_maddubs_epi16(a3, b), one));
    c4 = _mm256_add_epi32(c4, _mm256_madd_epi16(_mm256_maddubs_epi16(a4, b), one));
    __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(b));
  }
  __m256i s = _mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(c2, _mm256_add_epi32(c3, c4)));
  return _mm256_extract_epi32(s, 0);
}  // 5 x 32 = 160 MACs per iteration

__attribute__((noinline)) int int16(long iters) {
  __m256i a0 = _mm256_set1_epi16(3), a1 = _mm256_set1_epi16(4), a2 = _mm256_set1_epi16(5),
          a3 = _mm256_set1_epi16(6), a4 = _mm256_set1_epi16(7), a5 = _mm256_set1_epi16(8),
          b = _mm256_set1_epi16(-2);
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
  for (long i = 0; i < iters; ++i) {
    c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(a0, b));
    c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(a1, b));
    c2 = _mm256_add_epi32(c2, _mm256_madd_epi16(a2, b));
    c3 = _mm256_add_epi32(c3, _mm256_madd_epi16(a3, b));
    c4 = _mm256_add_epi32(c4, _mm256_madd_epi16(a4, b));
    c5 = _mm256_add_epi32(c5, _mm256_madd_epi16(a5, b));
    __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5), "+x"(b));
  }
  __m256i s = _mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(_mm256_add_epi32(c2, c3), _mm256_add_epi32(c4, c5)));
  return _mm256_extract_epi32(s, 0);
}  // 6 x 16 = 96 MACs per iteration

int main(int argc, char** argv) {
  long iters = argc > 1 ? atol(argv[1]) : 200000000;
  double best_f = 1e9, best_i = 1e9;
  volatile float sf = 0; volatile int si = 0;
  for (int r = 0; r < 7; ++r) {
    double t = now(); sf = sf + fp32(iters); best_f = std::min(best_f, now() - t);
    t = now(); si = si + int8(iters / 2); best_i = std::min(best_i, now() - t);
  }
  double best_w = 1e9; volatile int sw = 0;
  for (int r = 0; r < 7; ++r) { double t = now(); sw = sw + int16(iters / 2); best_w = std::min(best_w, now() - t); }
  printf("int16 madd+add %.1f GMAC/s\n", 96.0 * (iters / 2) / best_w / 1e9);
  double gf = 80.0 * iters / best_f / 1e9, gi = 160.0 * (iters / 2) / best_i / 1e9;
  printf("fp32 FMA %.1f GMAC/s, int8 maddubs+madd+add %.1f GMAC/s, int8 / fp32 %.2fx\n", gf, gi, gi / gf);
  return 0;
}
