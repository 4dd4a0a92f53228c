// Horizontal sums of several 512-bit vectors at once (AVX-512F only, so kernels without BF16 can
// include it): reduce16 for the bf16 kernels, reduce_n for any 1-16 vectors.
#pragma once

#include <immintrin.h>

namespace loom_simd {

// Lane i of the result is the sum of v[i]'s lanes, for i < N (at most 16; the other lanes are 0).
// A transpose-and-add tree costs ~3 instructions a vector instead of ~8 for N separate reductions,
// and pairs past N are not formed (8 vectors take about half of 16's). Each sum is made in the
// order of _mm512_reduce_add_ps: lanes j + (j + 8), then + (j + 4), + (j + 2), + (j + 1).
template <int N>
inline __m512 reduce_n(const __m512* v) {
  static_assert(N >= 1 && N <= 16);
  constexpr int kW = (N + 1) / 2, kX = (kW + 1) / 2, kY = (kX + 1) / 2;
  const __m512 zero = _mm512_setzero_ps();
  __m512 w[kW], x[kX], y[kY];
#pragma GCC unroll 8
  for (int i = 0; i < kW; ++i) {  // halves: w[i] = [v[2i] partial (8 lanes) | v[2i+1] partial]
    const __m512 a = v[2 * i], b = 2 * i + 1 < N ? v[2 * i + 1] : zero;
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
#pragma GCC unroll 4
  for (int i = 0; i < kX; ++i) {  // quarters: x[i] = [v[4i] | v[4i+1] | v[4i+2] | v[4i+3]], 4 lanes each
    const __m512 a = w[2 * i], b = 2 * i + 1 < kW ? w[2 * i + 1] : zero;
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
  }
#pragma GCC unroll 2
  for (int i = 0; i < kY; ++i) {  // + (j + 2): lanes 0 and 2 of each quarter, and 1 and 3
    const __m512 a = x[2 * i], b = 2 * i + 1 < kX ? x[2 * i + 1] : zero;
    y[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  }
  const __m512d a = _mm512_castps_pd(y[0]), b = _mm512_castps_pd(kY > 1 ? y[kY - 1] : zero);
  const __m512 z = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  // lane 4k+i now holds sum(v[4i+k]); put it back at lane 4i+k.
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(order, z);
}

inline __m512 reduce16(const __m512 v[16]) { return reduce_n<16>(v); }

}  // namespace loom_simd
