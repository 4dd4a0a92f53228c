// x W^T over block-quantized weights (loom.model.quant's packed layout), for any number of rows.
//
// The weights stay packed: per 32-element block, 4-bit codes in 16 bytes (byte j holds element j in
// its low nibble and element j + 16 in its high nibble, as GGUF does), plus one bit plane of 4 bytes
// for each bit above the fourth (5- and 6-bit codes), or 32 signed bytes for 8-bit codes. A group of
// `group` elements (16, or a multiple of 32) shares an fp16 scale and, for asymmetric formats, an
// fp16 min: w = scale * code + min, or scale * (code - offset) when there is no min.
//
// Activations are quantized to int8 per 32-element block, as llama.cpp's Q8 activations are, so the
// inner product is an integer dot product (VPDPBUSD with AVX512-VNNI or AVX-VNNI, else AVX2's
// VPMADDUBSW + VPMADDWD): sum_k w_k x_k = sum_b ws_b dx_b dot(code_b, xq_b) + sum_g min_g xsum_g.
// Each weight row is unpacked once into a small buffer and then applied to every activation row.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu_check.h"
#include "quant_codes.h"
#include "static_count.h"
#if defined(__AVX512F__)
#include "avx512_reduce.h"
#endif

#ifdef LOOM_QUANT_KERNELS

namespace {

using namespace loom_quant;

inline float load_f(const float* p) { return *p; }
inline float load_f(const c10::BFloat16* p) { return static_cast<float>(*p); }
inline void store_f(float* p, float v) { *p = v; }
inline void store_f(c10::BFloat16* p, float v) { *p = c10::BFloat16(v); }

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// 32 unsigned bytes times 32 signed bytes, summed in groups of four into 8 int32 lanes. Lane i
// covers elements 4i..4i+3 (so lanes 0-3 are the first 16 elements). The AVX2 form cannot
// saturate: unsigned operands are at most 63 (codes) or 128 (|w| of 8-bit codes), and signed ones
// at most 127 in magnitude, so a pair sums to at most 2 * 128 * 127 < 32768.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// One weight row, unpacked for the inner loop: codes (|w| for 8-bit), the signs (8-bit only), and
// the scales and mins per "slice": 16 elements for 16-element groups, else 32 (one block). For
// 16-element groups the scales are also laid out as 8 lanes per block (lanes 0-3 and 4-7 differ).
struct RowBuffer {
  std::vector<uint8_t> codes;
  std::vector<int8_t> signs;
  std::vector<float> scales;  // per slice
  std::vector<float> lanes;   // 16-element groups: 8 lanes per block
  std::vector<float> mins;    // per slice
  bool has_min = false;

  explicit RowBuffer(int64_t K) : codes(K), signs(K), scales(K / 16), lanes(K / kBlock * 8), mins(K / 16) {}

  void unpack(const Weights& w, int64_t n) {
    const int64_t blocks = w.K / kBlock;
    for (int64_t b = 0; b < blocks; ++b) {
      __m256i sign;
      const __m256i v = load_codes(w, n, b, sign);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes.data() + b * kBlock), v);
      if (w.bits == 8) _mm256_storeu_si256(reinterpret_cast<__m256i*>(signs.data() + b * kBlock), sign);
    }
    unpack_scales(w, n);
  }

  void unpack_scales(const Weights& w, int64_t n) {
    const int64_t K = w.K, blocks = K / kBlock, groups = K / w.group;
    const at::Half* sc = w.scale + n * groups;
    const at::Half* mn = w.min ? w.min + n * groups : nullptr;
    // Per slice: a 16-element group is a slice; a group of 32k elements spans k slices (blocks).
    const int64_t slices = w.group == 16 ? K / 16 : blocks, per_group = w.group == 16 ? 1 : w.group / kBlock;
    halves_to_floats(sc, scales.data(), groups);
    has_min = mn != nullptr || w.offset != 0.0f;
    if (mn) halves_to_floats(mn, mins.data(), groups);
    if (per_group > 1) {  // spread each group's values over its slices, last group first (in place)
      for (int64_t g = groups - 1; g >= 0; --g)
        for (int64_t i = (g + 1) * per_group - 1; i >= g * per_group; --i) {
          scales[i] = scales[g];
          if (mn) mins[i] = mins[g];
        }
    }
    if (has_min && !mn) {
      const __m256 neg = _mm256_set1_ps(-w.offset);
      int64_t i = 0;
      for (; i + 8 <= slices; i += 8) _mm256_storeu_ps(mins.data() + i, _mm256_mul_ps(neg, _mm256_loadu_ps(scales.data() + i)));
      for (; i < slices; ++i) mins[i] = -w.offset * scales[i];
    }
    if (w.group == 16)
      for (int64_t b = 0; b < blocks; ++b)
        _mm256_storeu_ps(lanes.data() + b * 8, _mm256_set_m128(_mm_set1_ps(scales[2 * b + 1]), _mm_set1_ps(scales[2 * b])));
  }
};

// Activations quantized per 32-element block: int8 values, the block scales, and the sums of the
// dequantized values of every 16 and every 32 elements (for the min term).
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<float> sums16;
  std::vector<float> sums32;
};

template <typename T>
QuantizedRows quantize_rows(const T* x, int64_t M, int64_t K) {
  const int64_t blocks = K / kBlock;
  QuantizedRows r{std::vector<int8_t>(M * K), std::vector<float>(M * blocks), std::vector<float>(M * K / 16),
                  std::vector<float>(M * blocks)};
  at::parallel_for(0, M * blocks, 256, [&](int64_t begin, int64_t end) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    for (int64_t i = begin; i < end; ++i) {
      const T* src = x + (i / blocks) * K + (i % blocks) * kBlock;
      __m256 v[4];
      __m256 amax = _mm256_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        v[j] = load8(src + 8 * j);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[j]));
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float max_abs = _mm_cvtss_f32(m4);
      const float d = max_abs / 127.0f;
      const __m256 inv = _mm256_set1_ps(d > 0 ? 1.0f / d : 0.0f);
      __m256i q32[4];
      for (int j = 0; j < 4; ++j) q32[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      // Pack 32 int32 into 32 int8, restoring element order after the lane-wise packs.
      const __m256i q16a = _mm256_packs_epi32(q32[0], q32[1]);
      const __m256i q16b = _mm256_packs_epi32(q32[2], q32[3]);
      __m256i q8 = _mm256_packs_epi16(q16a, q16b);
      q8 = _mm256_permutevar8x32_epi32(q8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(r.q.data() + i * kBlock), q8);
      r.d[i] = d;
      const int32_t lo = hsum_i32(_mm256_add_epi32(q32[0], q32[1]));
      const int32_t hi = hsum_i32(_mm256_add_epi32(q32[2], q32[3]));
      r.sums16[2 * i] = d * static_cast<float>(lo);
      r.sums16[2 * i + 1] = d * static_cast<float>(hi);
      r.sums32[i] = d * static_cast<float>(lo + hi);
    }
  });
  return r;
}

inline float dot_floats(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float total = hsum(acc);
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// MT activation rows (from m0) against one unpacked weight row; writes out[0..MT).
template <int MT, bool Signed, bool Group16>
inline void row_dot(const RowBuffer& row, const QuantizedRows& xq, int64_t m0, int64_t K, float* out) {
  const int64_t blocks = K / kBlock;
  __m256 acc[MT];
#pragma GCC unroll 4
  for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row.codes.data() + b * kBlock));
    const __m256 ws = Group16 ? _mm256_loadu_ps(row.lanes.data() + b * 8) : _mm256_broadcast_ss(row.scales.data() + b);
    __m256i sg;
    if constexpr (Signed) sg = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row.signs.data() + b * kBlock));
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) {
      __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq.q.data() + (m0 + m) * K + b * kBlock));
      if constexpr (Signed) xv = _mm256_sign_epi8(xv, sg);
      const __m256 scale = _mm256_mul_ps(ws, _mm256_broadcast_ss(xq.d.data() + (m0 + m) * blocks + b));
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(wv, xv)), scale, acc[m]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    float total = hsum(acc[m]);
    if (row.has_min)
      total += Group16 ? dot_floats(row.mins.data(), xq.sums16.data() + (m0 + m) * (K / 16), K / 16)
                       : dot_floats(row.mins.data(), xq.sums32.data() + (m0 + m) * blocks, blocks);
    out[m] = total;
  }
}

template <bool Signed, bool Group16>
void rows_dot(const RowBuffer& row, const QuantizedRows& xq, int64_t M, int64_t K, float* out) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) row_dot<4, Signed, Group16>(row, xq, m, K, out + m);
  if (M > m)
    with_count<3>(M - m, [&](auto r) { row_dot<decltype(r)::value, Signed, Group16>(row, xq, m, K, out + m); });
}

// Few activation rows over groups of 64 or more (gemv below serves 16 and 32). Per weight row, what
// the inner loop needs besides the codes is prepared first: the block scales (with the activation's
// block scale folded in when there is one activation row), and the min term sum_g min_g xsum_g of
// every activation row.
struct SmallMScratch {
  std::vector<float> group_scales, group_mins;  // [groups] of the row being prepared
  std::vector<float> scales;                    // [NR][blocks]
  std::vector<float> min_terms;                 // [NR][M]
  int64_t stride;                               // floats per row in `scales`

  SmallMScratch(int64_t K, int64_t group, int64_t M, int nr)
      : group_scales(K / group), group_mins(K / group), scales(nr * (K / kBlock)), min_terms(nr * M),
        stride(K / kBlock) {}
};

// Activation sums per weight group ([M][groups]), for the min terms.
std::vector<float> group_sums(const QuantizedRows& xq, int64_t M, int64_t K, int64_t group) {
  const int64_t groups = K / group, blocks = K / kBlock;
  std::vector<float> out(M * groups, 0.0f);
  const int64_t per_group = group / kBlock;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b) out[m * groups + b / per_group] += xq.sums32[m * blocks + b];
  return out;
}

void prepare_row(const Weights& w, const QuantizedRows& xq, const std::vector<float>& xsums, int64_t n, int64_t M,
                 SmallMScratch& s, int r) {
  const int64_t K = w.K, blocks = K / kBlock, groups = K / w.group, per_group = w.group / kBlock;
  float* gs = s.group_scales.data();
  halves_to_floats(w.scale + n * groups, gs, groups);
  float* mt = s.min_terms.data() + r * M;
  if (w.min) {
    halves_to_floats(w.min + n * groups, s.group_mins.data(), groups);
    for (int64_t m = 0; m < M; ++m) mt[m] = dot_floats(s.group_mins.data(), xsums.data() + m * groups, groups);
  } else {
    for (int64_t m = 0; m < M; ++m)
      mt[m] = w.offset == 0.0f ? 0.0f : -w.offset * dot_floats(gs, xsums.data() + m * groups, groups);
  }
  const bool fold = M == 1;
  float* sc = s.scales.data() + r * s.stride;
  for (int64_t b = 0; b < blocks; ++b) sc[b] = fold ? gs[b / per_group] * xq.d[b] : gs[b / per_group];
}

// MT activation rows against NR weight rows from n0: codes unpacked in registers and used at once,
// each activation block loaded once for all NR rows. No branch in the block loop, so the MT * NR
// accumulators stay in registers. Rows are short (K = 576 is 288 bytes of 4-bit codes), so each
// block's prefetch is the same block of the same row in the next tile, NR rows on (a prefetch past
// the end of the weights is harmless).
template <int MT, int NR, int Bits>
void small_m_rows(const Weights& w, const QuantizedRows& xq, int64_t n0, const SmallMScratch& s, float* out /* [NR][MT] */) {
  const int64_t K = w.K, blocks = K / kBlock;
  constexpr bool kFoldDx = MT == 1;
  constexpr int64_t kBlockBytes = Bits == 8 ? kBlock : 16;
  const int64_t ahead = NR * (w.bits == 8 ? K : K / 2);
  const uint8_t* qs[NR];
  const uint8_t* qh[NR];
  const float* sc[NR];
  for (int r = 0; r < NR; ++r) {
    qs[r] = qs_row(w, n0 + r);
    qh[r] = qh_row(w, n0 + r);
    sc[r] = s.scales.data() + r * s.stride;
  }
  __m256 acc[MT][NR];
#pragma GCC unroll 4
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i xv[MT];
    __m256 dx[MT];
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) {
      xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq.q.data() + m * K + b * kBlock));
      if constexpr (!kFoldDx) dx[m] = _mm256_broadcast_ss(xq.d.data() + m * blocks + b);
    }
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(qs[r] + ahead + b * kBlockBytes), _MM_HINT_T0);
      __m256i sign;
      const __m256i wv = load_codes<Bits>(qs[r], qh[r], b, sign);
      const __m256 ws = _mm256_broadcast_ss(sc[r] + b);
#pragma GCC unroll 4
      for (int m = 0; m < MT; ++m) {
        const __m256i xs = Bits == 8 ? _mm256_sign_epi8(xv[m], sign) : xv[m];
        const __m256 scale = kFoldDx ? ws : _mm256_mul_ps(ws, dx[m]);
        acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(wv, xs)), scale, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) out[r * MT + m] = hsum(acc[m][r]) + s.min_terms[r * MT + m];
}

// The next tile's scales and mins, NR rows from n.
inline void prefetch_scales(const Weights& w, int64_t n, int NR) {
  const int64_t groups = w.K / w.group;
  for (int64_t byte = 0; byte < NR * groups * 2; byte += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(w.scale + n * groups) + byte, _MM_HINT_T0);
    if (w.min) _mm_prefetch(reinterpret_cast<const char*>(w.min + n * groups) + byte, _MM_HINT_T0);
  }
}

template <int MT, int Bits>
void small_m(const Weights& w, const QuantizedRows& xq, const std::vector<float>& xsums, int64_t begin, int64_t end,
             SmallMScratch& s, float* tile) {
  constexpr int NR = MT <= 2 ? 4 : 2;  // MT * NR accumulators stay in registers
  int64_t n = begin;
  for (; n + NR <= end; n += NR) {
    prefetch_scales(w, n + NR, NR);
    for (int r = 0; r < NR; ++r) prepare_row(w, xq, xsums, n + r, MT, s, r);
    small_m_rows<MT, NR, Bits>(w, xq, n, s, tile + n * MT);
  }
  for (; n < end; ++n) {
    prepare_row(w, xq, xsums, n, MT, s, 0);
    small_m_rows<MT, 1, Bits>(w, xq, n, s, tile + n * MT);
  }
}

// MT activation rows (decode, or a few verification rows) and 32- or 16-element groups: the scales and
// mins are read as stored, 8 blocks at a time, inside the block loop, so there is no preparation pass
// per weight row (at K = 576 a row is only 18 blocks, and that pass cost as much as the dot products).
// Each weight block is unpacked once for the MT rows. Every row's sums are made in the same order as
// with MT = 1, so a row's result does not depend on the rows beside it (speculative verification
// rows equal plain decode, bit for bit).
template <int MT, int NR, int Bits, bool Group16>
void gemv_rows(const Weights& w, const QuantizedRows& xq, int64_t n0, float* out /* [NR][MT] */) {
  const int64_t K = w.K, blocks = K / kBlock, groups = K / w.group;
  constexpr int64_t kBlockBytes = Bits == 8 ? kBlock : 16;
  constexpr int64_t kPlaneBytes = Bits == 5 || Bits == 6 ? 4 * (Bits - 4) : 0;  // bit planes per block
  constexpr int kLanes = Group16 ? 8 : 1;  // floats per block in `folded`: 8 lanes for 16-element groups
  const int64_t ahead = NR * (Bits == 8 ? K : K / 2);  // same block, next tile (see small_m_rows)
  const uint8_t* qs[NR];
  const uint8_t* qh[NR];
  const at::Half* sc[NR];
  const at::Half* mn[NR];
  for (int r = 0; r < NR; ++r) {
    qs[r] = qs_row(w, n0 + r);
    qh[r] = qh_row(w, n0 + r);
    sc[r] = w.scale + (n0 + r) * groups;
    mn[r] = w.min ? w.min + (n0 + r) * groups : nullptr;
  }
  const int64_t sums_per_row = Group16 ? K / 16 : blocks;  // one per group
  const float* xsums = Group16 ? xq.sums16.data() : xq.sums32.data();
  __m256 acc[MT][NR], min_acc[MT][NR];  // min_acc: sum_g min_g xsum_g, or sum_g scale_g xsum_g without mins
#pragma GCC unroll 4
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) acc[m][r] = min_acc[m][r] = _mm256_setzero_ps();
  alignas(32) float folded[MT][NR][8 * kLanes];  // scale * dx for the 8 blocks at hand
  for (int64_t b0 = 0; b0 < blocks; b0 += 8) {
    const int64_t nb = std::min<int64_t>(8, blocks - b0);
    for (int m = 0; m < MT; ++m) {
      const float* dxm = xq.d.data() + m * blocks;
      const float* xsm = xsums + m * sums_per_row;
      if (nb == 8 && !Group16) {
        const __m256 dx = _mm256_loadu_ps(dxm + b0), xs = _mm256_loadu_ps(xsm + b0);
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) {
          const __m256 s8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc[r] + b0)));
          _mm256_store_ps(folded[m][r], _mm256_mul_ps(s8, dx));
          const __m256 m8 = mn[r] ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn[r] + b0))) : s8;
          min_acc[m][r] = _mm256_fmadd_ps(m8, xs, min_acc[m][r]);
        }
      } else if (nb == 8) {  // 16-element groups: 16 scales, two per block
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r)
          for (int h = 0; h < 2; ++h) {  // blocks b0 + 4h .. b0 + 4h + 3
            const int64_t g = 2 * b0 + 8 * h;
            const __m256 s8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc[r] + g)));
            const __m256 m8 = mn[r] ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn[r] + g))) : s8;
            min_acc[m][r] = _mm256_fmadd_ps(m8, _mm256_loadu_ps(xsm + g), min_acc[m][r]);
            for (int j = 0; j < 4; ++j) {  // lanes 0-3: the block's first group, 4-7: its second
              const __m256i pick = _mm256_setr_epi32(2 * j, 2 * j, 2 * j, 2 * j, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1);
              const __m256 lanes = _mm256_permutevar8x32_ps(s8, pick);
              _mm256_store_ps(folded[m][r] + (4 * h + j) * 8, _mm256_mul_ps(lanes, _mm256_broadcast_ss(dxm + b0 + 4 * h + j)));
            }
          }
      } else {  // the last blocks of a row whose block count is not a multiple of 8
        for (int r = 0; r < NR; ++r) {
          float total = 0.0f;
          for (int64_t j = 0; j < nb; ++j) {
            const float dx = dxm[b0 + j];
            for (int e = 0; e < (Group16 ? 2 : 1); ++e) {
              const int64_t g = Group16 ? 2 * (b0 + j) + e : b0 + j;
              const float s1 = half(sc[r][g]);
              total = std::fma(mn[r] ? half(mn[r][g]) : s1, xsm[g], total);  // into lane 0 below
              if constexpr (Group16) {
                for (int l = 0; l < 4; ++l) folded[m][r][j * 8 + 4 * e + l] = s1 * dx;
              } else {
                folded[m][r][j] = s1 * dx;
              }
            }
          }
          min_acc[m][r] = _mm256_add_ps(min_acc[m][r], _mm256_setr_ps(total, 0, 0, 0, 0, 0, 0, 0));
        }
      }
    }
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t b = b0 + j;
      __m256i xv[MT];
#pragma GCC unroll 4
      for (int m = 0; m < MT; ++m)
        xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq.q.data() + m * K + b * kBlock));
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(qs[r] + ahead + b * kBlockBytes), _MM_HINT_T0);
        if constexpr (kPlaneBytes > 0)
          _mm_prefetch(reinterpret_cast<const char*>(qh[r] + NR * blocks * kPlaneBytes + b * kPlaneBytes), _MM_HINT_T0);
        __m256i sign;
        const __m256i wv = load_codes<Bits>(qs[r], qh[r], b, sign);
#pragma GCC unroll 4
        for (int m = 0; m < MT; ++m) {
          const __m256i xs = Bits == 8 ? _mm256_sign_epi8(xv[m], sign) : xv[m];
          const __m256 ws = Group16 ? _mm256_load_ps(folded[m][r] + j * 8) : _mm256_broadcast_ss(folded[m][r] + j);
          acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(wv, xs)), ws, acc[m][r]);
        }
      }
    }
  }
  const float min_factor = w.min ? 1.0f : -w.offset;  // without mins, min_g = -offset * scale_g
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) out[r * MT + m] = hsum(acc[m][r]) + min_factor * hsum(min_acc[m][r]);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define LOOM_GEMV_ZMM 1
constexpr int64_t kWideM = 9;  // 4-bit and 8-bit codes in groups of 32: up to this many rows in registers
#endif
constexpr int64_t kSmallM = 4;  // other formats: up to this many rows in registers; beyond, AMX tiles or the row buffer
#ifndef LOOM_GEMV_ZMM
constexpr int64_t kWideM = kSmallM;
#endif
struct ZmmActivations;  // gemv_rows_zmm's activation operands

#ifdef LOOM_GEMV_ZMM
// The first n bytes of a 64-byte load (all of them for n >= 64).
inline __mmask64 first_bytes(int64_t n) { return n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1; }

// The activation operands of gemv_rows_zmm for the `live` blocks (at most four 4-bit or two 8-bit
// ones) from x: 4-bit: elements 0-15 of each block in xa and 16-31 in xb; 8-bit: the blocks in xa,
// -128 * their four-element sums in xb. Blocks past `live` are zeros.
template <int Bits>
inline void zmm_activations(const int8_t* x, int64_t live, __m512i& xa, __m512i& xb) {
  if constexpr (Bits == 4) {
    const int64_t bytes = live * kBlock;
    const __m512i first = _mm512_maskz_loadu_epi8(first_bytes(bytes), x);
    const __m512i second = bytes > 64 ? _mm512_maskz_loadu_epi8(first_bytes(bytes - 64), x + 64) : _mm512_setzero_si512();
    xa = _mm512_shuffle_i64x2(first, second, 0x88);  // 128-bit lanes 0 and 2 of each: elements 0-15
    xb = _mm512_shuffle_i64x2(first, second, 0xDD);  // lanes 1 and 3: elements 16-31
  } else {
    xa = _mm512_maskz_loadu_epi8(first_bytes(live * kBlock), x);
    xb = _mm512_sub_epi32(_mm512_setzero_si512(),
                          _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(static_cast<char>(0x80)), xa));
  }
}

// The codes of up to four (4-bit) or two (8-bit) blocks of a weight row at p, as VPDPBUSD's unsigned
// operands: 4-bit: low nibbles in lo, high nibbles in hi; 8-bit: code ^ 0x80 in lo (hi unused).
template <int Bits>
inline void zmm_codes(const uint8_t* p, __mmask64 mask, __m512i& lo, __m512i& hi) {
  const __m512i codes = _mm512_maskz_loadu_epi8(mask, p);
  if constexpr (Bits == 4) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    lo = _mm512_and_si512(codes, low4);
    hi = _mm512_and_si512(_mm512_srli_epi16(codes, 4), low4);
  } else {
    lo = _mm512_xor_si512(codes, _mm512_set1_epi8(static_cast<char>(0x80)));
  }
}

// The block (among the four 4-bit or two 8-bit ones at hand) that each lane of a dot belongs to:
// l / 4, or l / 8.
template <int Bits>
inline __m512i zmm_lane_block() {
  return Bits == 4 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
                   : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
}

// acc + the dot products of zmm_codes' and zmm_activations' operands, times the blocks' scales
// (lane l of `scales` picked by `pick`).
template <int Bits>
inline __m512 zmm_dot_fma(__m512i lo, __m512i hi, __m512i xa, __m512i xb, __m512i pick, __m512 scales, __m512 acc) {
  const __m512i dot = Bits == 4 ? _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xa), hi, xb)
                                : _mm512_dpbusd_epi32(xb, lo, xa);
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(pick, scales), acc);
}

// A chunk of 16 whole blocks of 4-bit codes, transposed: lane 4q + i of a dot sums all 32 products
// of block 4i + q, so the chunk takes one float multiply-add per activation row instead of four
// (with four lanes per block, the int32-to-float conversion, the scale pick and the multiply-add
// per four blocks cost more than the VPDPBUSDs once several activation rows share the codes). The
// default model's matrices took 20-25% less time for 4 and 9 rows.
constexpr int64_t kChunk = 16;
// The block of each lane of a chunk's dot.
inline __m512i zmm_chunk_lanes() { return _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15); }

// The 256 bytes of codes of a chunk at p as VPDPBUSD's unsigned operands: lane 4q + i of lo[j] holds
// elements 4j..4j+3 of block 4i + q, and of hi[j] elements 16 + 4j..16 + 4j + 3. (A 4x4 transpose
// of dwords within each 128-bit lane of the four loads, whose lane q holds blocks q, 4 + q, 8 + q
// and 12 + q.)
inline void zmm_chunk_codes(const uint8_t* p, __m512i lo[4], __m512i hi[4]) {
  const __m512i s0 = _mm512_loadu_si512(p), s1 = _mm512_loadu_si512(p + 64);
  const __m512i s2 = _mm512_loadu_si512(p + 128), s3 = _mm512_loadu_si512(p + 192);
  const __m512i t0 = _mm512_unpacklo_epi32(s0, s1), t1 = _mm512_unpackhi_epi32(s0, s1);
  const __m512i t2 = _mm512_unpacklo_epi32(s2, s3), t3 = _mm512_unpackhi_epi32(s2, s3);
  const __m512i o[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2), _mm512_unpacklo_epi64(t1, t3),
                        _mm512_unpackhi_epi64(t1, t3)};
  const __m512i low4 = _mm512_set1_epi8(0x0F);
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    lo[j] = _mm512_and_si512(o[j], low4);
    hi[j] = _mm512_and_si512(_mm512_srli_epi16(o[j], 4), low4);
  }
}

// acc + a chunk's dot products with one activation row's chunk operands x (ZmmActivations::chunk),
// put back in block order, times the blocks' scales.
inline __m512 zmm_chunk_fma(const __m512i lo[4], const __m512i hi[4], const __m512i* x, __m512 scales, __m512 acc) {
  __m512i dot = _mm512_setzero_si512();
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j)
    dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(dot, lo[j], _mm512_load_si512(x + 2 * j)), hi[j], _mm512_load_si512(x + 2 * j + 1));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_permutexvar_epi32(zmm_chunk_lanes(), dot)), scales, acc);
}

// The activation operands of gemv_rows_zmm, made once per product: per row, for 4-bit codes
// zmm_chunk_fma's eight operands for every whole chunk, then zmm_activations' pair for every step of
// kPer blocks past them.
struct ZmmActivations {
  static constexpr int64_t kPerChunk = 8;  // zmm_chunk_fma's operands
  std::vector<__m512i> v;  // [M][whole * kPerChunk + (steps - first_step) * 2]
  int64_t whole, first_step, per_row;

  ZmmActivations(const QuantizedRows& xq, int64_t M, int64_t K, int bits) {
    const int64_t blocks = K / kBlock, per = bits == 4 ? 4 : 2, steps = (blocks + per - 1) / per;
    whole = bits == 4 ? blocks / kChunk : 0;
    first_step = whole * kChunk / per;
    per_row = whole * kPerChunk + (steps - first_step) * 2;
    v.resize(M * per_row);
    const __m512i starts = _mm512_slli_epi32(zmm_chunk_lanes(), 5);  // the lanes' blocks' first bytes
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t c = 0; c < whole; ++c) {
        __m512i* dst = v.data() + m * per_row + c * kPerChunk;
        const int8_t* x = xq.q.data() + m * K + c * kChunk * kBlock;
        for (int j = 0; j < 4; ++j) {
          dst[2 * j] = _mm512_i32gather_epi32(_mm512_add_epi32(starts, _mm512_set1_epi32(4 * j)), x, 1);
          dst[2 * j + 1] = _mm512_i32gather_epi32(_mm512_add_epi32(starts, _mm512_set1_epi32(16 + 4 * j)), x, 1);
        }
      }
      for (int64_t s = first_step; s < steps; ++s) {
        const int8_t* x = xq.q.data() + m * K + s * per * kBlock;
        __m512i* dst = v.data() + m * per_row + whole * kPerChunk + (s - first_step) * 2;
        if (bits == 4) zmm_activations<4>(x, std::min(per, blocks - s * per), dst[0], dst[1]);
        else zmm_activations<8>(x, std::min(per, blocks - s * per), dst[0], dst[1]);
      }
    }
  }
  // Row m's operands for step s (of kPer blocks, past the whole chunks).
  const __m512i* step(int64_t m, int64_t s) const {
    return v.data() + m * per_row + whole * kPerChunk + (s - first_step) * 2;
  }
  // Row m's operands for chunk c.
  const __m512i* chunk(int64_t m, int64_t c) const { return v.data() + m * per_row + c * kPerChunk; }
};

// The first n (at most 16) lanes.
inline __mmask16 chunk_mask(int64_t n) { return n >= kChunk ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1); }

// gemv_rows for 4-bit codes in groups of 32 (Q4_0, Q4_1, and Q4_K as loom stores it) and 8-bit codes
// (Q8_0) in 512-bit registers, for up to kWideM activation rows (NR weight rows at a time).
// - One 64-byte load holds four blocks of 4-bit codes of a row (their low nibbles are elements 0-15
//   of each block, the high nibbles elements 16-31) or two blocks of 8-bit codes, so one or two
//   VPDPBUSD cover what takes four (two) in gemv_rows. The activations are shuffled to match
//   (elements 0-15 of the four blocks, then 16-31), so that a dot lane holds four elements of one block.
// - Whole chunks of 16 blocks of 4-bit codes are transposed instead (zmm_chunk_codes), so that a lane
//   holds a whole block.
// - 8-bit codes are signed, and VPDPBUSD multiplies unsigned by signed bytes: the codes are offset by
//   128 (code ^ 0x80), and each lane starts from -128 * (its four activations).
// - Scales and mins are read as stored, 16 blocks at a time (masked past the row's end, so a row of
//   18 blocks takes no scalar tail), and each dot picks its blocks' scales from a register.
// - The activation operands come from ZmmActivations, made once per product.
// Every float operation on a row is the same, in the same order, for every MT, so a row's result is
// the same bits whatever the rows beside it: speculative verification of up to kWideM - 1 drafts
// computes exactly what plain decode would. (It is not gemv_rows' order: results differ from it in
// the last bits.)
template <int MT, int NR, int Bits>
void gemv_rows_zmm(const Weights& w, const ZmmActivations& xs, const QuantizedRows& xq, int64_t n0,
                   float* out /* [NR][MT] */) {
  static_assert(Bits == 4 || Bits == 8);
  constexpr int kPer = Bits == 4 ? 4 : 2;  // blocks per 64-byte load of codes
  constexpr int64_t kBlockBytes = Bits == 8 ? kBlock : 16;
  const int64_t K = w.K, blocks = K / kBlock;
  const int64_t ahead = std::max(NR, 4) * (Bits == 8 ? K : K / 2);  // same block, NR (at least 4) rows on
  const uint8_t* qs[NR];
  const at::Half* sc[NR];
  const at::Half* mn[NR];
  for (int r = 0; r < NR; ++r) {
    qs[r] = qs_row(w, n0 + r);
    sc[r] = w.scale + (n0 + r) * blocks;
    mn[r] = w.min ? w.min + (n0 + r) * blocks : nullptr;
  }
  const __m512i lane_block = zmm_lane_block<Bits>();
  // The dot products times their scales, plus sum_g min_g xsum_g (sum_g -offset scale_g xsum_g
  // without mins).
  __m512 acc[MT][NR];
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  const bool mins = w.min || w.offset != 0.0f;
  const __m512 neg_offset = _mm512_set1_ps(-w.offset);
  for (int64_t b0 = 0; b0 < blocks; b0 += kChunk) {
    const int64_t nb = std::min<int64_t>(kChunk, blocks - b0);
    const __mmask16 chunk = chunk_mask(nb);
    const bool transposed = Bits == 4 && nb == kChunk;
    __m512 scales[MT][NR];  // the chunk's 16 block scales times the activation's
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const __m512 s16 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(chunk, sc[r] + b0));
      const __m512 m16 = mn[r] ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(chunk, mn[r] + b0)) : _mm512_mul_ps(s16, neg_offset);
#pragma GCC unroll 16
      for (int m = 0; m < MT; ++m) {
        scales[m][r] = _mm512_mul_ps(s16, _mm512_maskz_loadu_ps(chunk, xq.d.data() + m * blocks + b0));
        if (mins) acc[m][r] = _mm512_fmadd_ps(m16, _mm512_maskz_loadu_ps(chunk, xq.sums32.data() + m * blocks + b0), acc[m][r]);
      }
    }
    if (transposed) {
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) {
        for (int i = 0; i < 4; ++i)
          _mm_prefetch(reinterpret_cast<const char*>(qs[r] + ahead + b0 * kBlockBytes + 64 * i), _MM_HINT_T0);
        __m512i lo[4], hi[4];
        zmm_chunk_codes(qs[r] + b0 * kBlockBytes, lo, hi);
#pragma GCC unroll 16
        for (int m = 0; m < MT; ++m) acc[m][r] = zmm_chunk_fma(lo, hi, xs.chunk(m, b0 / kChunk), scales[m][r], acc[m][r]);
      }
      continue;
    }
    for (int64_t j = 0; j < nb; j += kPer) {
      const int64_t b = b0 + j;
      const __mmask64 code_mask = first_bytes(std::min<int64_t>(kPer, nb - j) * kBlockBytes);
      const __m512i pick = _mm512_add_epi32(lane_block, _mm512_set1_epi32(static_cast<int>(j)));
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(qs[r] + ahead + b * kBlockBytes), _MM_HINT_T0);
        __m512i lo, hi;
        zmm_codes<Bits>(qs[r] + b * kBlockBytes, code_mask, lo, hi);
#pragma GCC unroll 16
        for (int m = 0; m < MT; ++m) {
          const __m512i* x = xs.step(m, b / kPer);
          acc[m][r] = zmm_dot_fma<Bits>(lo, hi, _mm512_load_si512(x), _mm512_load_si512(x + 1), pick, scales[m][r], acc[m][r]);
        }
      }
    }
  }
  __m512 sums[NR * MT];  // in the order of out
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) sums[r * MT + m] = acc[m][r];
  // The sums two to four per instruction: they were a quarter of a 9-row product's time at K = 576,
  // whose rows are only 18 blocks long.
  _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << (NR * MT)) - 1), loom_simd::reduce_n<NR * MT>(sums));
}
#endif

// Rows begin..end of the product with MT activation rows, into out[n * MT + m].
template <int MT, int Bits, bool Group16>
void gemv(const Weights& w, const QuantizedRows& xq, [[maybe_unused]] const ZmmActivations* zmm, int64_t begin,
          int64_t end, float* out) {
#ifdef LOOM_GEMV_ZMM
  constexpr bool kZmm = (Bits == 4 || Bits == 8) && !Group16;
#else
  constexpr bool kZmm = false;
#endif
  // MT * NR accumulators (and as many min sums) stay in registers. One activation row takes 8 weight
  // rows in 512-bit registers: the default model's decode stack ran 15% faster than with 4 with its
  // weights in cache (the activation loads and shuffles run once per tile, and twice the rows' loads
  // are in flight).
  constexpr int NR = MT > kSmallM ? 1 : MT == 1 && kZmm ? 8 : MT <= 2 ? 4 : 2;
  auto rows = [&](auto nr, int64_t n) {
    constexpr int R = decltype(nr)::value;
#ifdef LOOM_GEMV_ZMM
    if constexpr (kZmm) gemv_rows_zmm<MT, R, Bits>(w, *zmm, xq, n, out + n * MT); else
#endif
    gemv_rows<MT, R, Bits, Group16>(w, xq, n, out + n * MT);
  };
  int64_t n = begin;
  for (; n + NR <= end; n += NR) {
    prefetch_scales(w, n + NR, NR);
    rows(std::integral_constant<int, NR>{}, n);
  }
  for (; n < end; ++n) rows(std::integral_constant<int, 1>{}, n);
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(c10::BFloat16* p, __m256 v) {
  // Round to nearest even, and NaN to 0x7FC0, as c10::BFloat16's conversion does.
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

// out[m * N + n] = tile[n * M + m] + bias[n] for rows begin..end, eight columns at a time.
template <typename T>
void store_tile(const float* tile, const T* bias, T* out, int64_t M, int64_t N, int64_t begin, int64_t end) {
  int64_t n = begin;
  const __m256i stride = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int>(M)));
  for (; n + 8 <= end; n += 8) {
    const __m256 b = bias ? load8(bias + n) : _mm256_setzero_ps();
    for (int64_t m = 0; m < M; ++m) {
      const float* src = tile + n * M + m;
      const __m256 v = M == 1 ? _mm256_loadu_ps(src) : _mm256_i32gather_ps(src, stride, 4);
      store8(out + m * N + n, _mm256_add_ps(v, b));
    }
  }
  for (; n < end; ++n) {
    const float b = bias ? load_f(bias + n) : 0.0f;
    for (int64_t m = 0; m < M; ++m) store_f(out + m * N + n, tile[n * M + m] + b);
  }
}

template <typename T>
void quant_matmul_impl(const T* x, const Weights& w, const T* bias, T* out, int64_t M, int64_t N) {
  const int64_t K = w.K;
  const int64_t register_rows = (w.bits == 4 || w.bits == 8) && w.group == kBlock ? kWideM : kSmallM;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // Beyond the register path's rows, unpacking the weight to bf16 for AMX tiles costs less than the
    // int8 dot products. Measured on the default model's matrices (q4_1, q8_0 head), ms per step:
    // 5 rows 12.8-13.8 in registers against 22.3-24.6 on AMX, 9 rows 19.4-22.1 against 23.2-25.3
    // (the row buffer took 25-45 ms from 5 rows up).
    if (M > register_rows && amx_ready()) return amx_matmul(x, w, bias, out, M, N);
  }
  const QuantizedRows xq = quantize_rows(x, M, K);
  if (M <= register_rows) {
    // tile: per weight row n, its MT results at [n * M, n * M + M), scattered to out at the end.
    std::vector<float> tile(N * M);
    const bool stored_groups = w.group == kBlock || w.group == 16;  // gemv reads the scales as stored
    const std::vector<float> xsums = stored_groups ? std::vector<float>() : group_sums(xq, M, K, w.group);
#ifdef LOOM_GEMV_ZMM
    const bool zmm_path = stored_groups && (w.bits == 4 || w.bits == 8);  // gemv's kZmm
    const std::unique_ptr<ZmmActivations> zmm_owned = zmm_path ? std::make_unique<ZmmActivations>(xq, M, K, w.bits) : nullptr;
    const ZmmActivations* zmm = zmm_owned.get();
#else
    const ZmmActivations* zmm = nullptr;
#endif
    parallel_chunks(N, [&](int64_t begin, int64_t end) {
      float* t = tile.data();
      auto run = [&](auto mt) {
        constexpr int MT = decltype(mt)::value;
        if constexpr (MT > kSmallM) {  // 4- or 8-bit codes in groups of 32 (register_rows)
          if (w.bits == 4) gemv<MT, 4, false>(w, xq, zmm, begin, end, t);
          else gemv<MT, 8, false>(w, xq, zmm, begin, end, t);
        } else if (stored_groups) {
          switch (w.bits) {  // 16-element groups: 6-bit (Q6_K) only
            case 4: gemv<MT, 4, false>(w, xq, zmm, begin, end, t); break;
            case 5: gemv<MT, 5, false>(w, xq, nullptr, begin, end, t); break;
            case 6:
              if (w.group == 16) gemv<MT, 6, true>(w, xq, nullptr, begin, end, t);
              else gemv<MT, 6, false>(w, xq, nullptr, begin, end, t);
              break;
            default: gemv<MT, 8, false>(w, xq, zmm, begin, end, t); break;
          }
        } else {
          SmallMScratch scratch(K, w.group, MT, 4);
          switch (w.bits) {
            case 4: small_m<MT, 4>(w, xq, xsums, begin, end, scratch, t); break;
            case 5: small_m<MT, 5>(w, xq, xsums, begin, end, scratch, t); break;
            case 6: small_m<MT, 6>(w, xq, xsums, begin, end, scratch, t); break;
            default: small_m<MT, 8>(w, xq, xsums, begin, end, scratch, t); break;
          }
        }
      };
      with_count<kWideM>(M, run);
      store_tile(tile.data(), bias, out, M, N, begin, end);
    });
    return;
  }
  parallel_chunks(N, [&](int64_t begin, int64_t end) {
    RowBuffer row(K);
    std::vector<float> col(M);
    for (int64_t n = begin; n < end; ++n) {
      row.unpack(w, n);
      if (w.bits == 8) rows_dot<true, false>(row, xq, M, K, col.data());  // 8-bit formats have no 16-groups
      else if (w.group == 16) rows_dot<false, true>(row, xq, M, K, col.data());
      else rows_dot<false, false>(row, xq, M, K, col.data());
      const float b = bias ? load_f(bias + n) : 0.0f;
      for (int64_t m = 0; m < M; ++m) store_f(out + m * N + n, col[m] + b);
    }
  });
}

template <typename T>
void dequantize_impl(const Weights& w, T* out, int64_t N) {
  const int64_t K = w.K, blocks = K / kBlock;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    RowBuffer row(K);
    for (int64_t n = begin; n < end; ++n) {
      row.unpack(w, n);
      T* dst = out + n * K;
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* c = row.codes.data() + b * kBlock;
        const int8_t* sg = row.signs.data() + b * kBlock;
        for (int h = 0; h < 2; ++h) {
          const int64_t slice = w.group == 16 ? 2 * b + h : b;
          const __m256 scale = _mm256_set1_ps(row.scales[slice]);
          const __m256 mn = _mm256_set1_ps(row.has_min ? row.mins[slice] : 0.0f);
          for (int j = 0; j < 16; j += 8) {
            const int64_t e = 16 * h + j;
            __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + e)));
            if (w.bits == 8) q = _mm256_sign_epi32(q, _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sg + e))));
            store8(dst + b * kBlock + e, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), scale, mn));
          }
        }
      }
    }
  });
}

}  // namespace

// x: [M, K] float32 or bfloat16; the packed weight of N rows (see the top of this file); bias: [N] in
// x's dtype or None. Returns [M, N] in x's dtype.
namespace {

using namespace loom_quant;

Weights checked_weights(const torch::Tensor& qs, const c10::optional<torch::Tensor>& qh, const torch::Tensor& scale,
                        const c10::optional<torch::Tensor>& min, int64_t bits, int64_t group, double offset, int64_t K) {
  LOOM_CHECK_CPU(qs);
  TORCH_CHECK(bits == 4 || bits == 5 || bits == 6 || bits == 8, "bits must be 4, 5, 6 or 8");
  TORCH_CHECK(K % kBlock == 0, "K must be a multiple of 32");
  TORCH_CHECK(group == 16 || (group % kBlock == 0 && K % group == 0), "group must be 16 or a multiple of 32 dividing K");
  TORCH_CHECK(bits != 8 || group != 16, "8-bit codes take groups of 32 or more");
  const int64_t N = qs.size(0);
  TORCH_CHECK(qs.dim() == 2 && qs.is_contiguous() && qs.size(1) == (bits == 8 ? K : K / 2), "qs does not match K");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.numel() == N * (K / group), "bad scale");
  Weights w{static_cast<const uint8_t*>(qs.data_ptr()), nullptr, scale.data_ptr<at::Half>(), nullptr,
            static_cast<int>(bits), group, static_cast<float>(offset), K};
  if (bits == 5 || bits == 6) {
    TORCH_CHECK(qh && qh->is_contiguous() && qh->numel() == N * (K / kBlock) * 4 * (bits - 4), "bad qh");
    w.qh = qh->data_ptr<uint8_t>();
  }
  if (min && min->defined()) {
    TORCH_CHECK(min->scalar_type() == at::kHalf && min->is_contiguous() && min->numel() == scale.numel(), "bad min");
    w.min = min->data_ptr<at::Half>();
  }
  return w;
}

template <typename T>
const T* bias_ptr(const c10::optional<torch::Tensor>& bias, at::ScalarType dtype, int64_t N) {
  if (!bias || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == dtype && bias->numel() == N && bias->is_contiguous(), "bias must match x and N");
  return bias->data_ptr<T>();
}

}  // namespace

torch::Tensor quant_matmul(torch::Tensor x, torch::Tensor qs, c10::optional<torch::Tensor> qh, torch::Tensor scale,
                           c10::optional<torch::Tensor> min, int64_t bits, int64_t group, double offset,
                           c10::optional<torch::Tensor> bias) {
  LOOM_CHECK_CPU(x);
  TORCH_CHECK(x.dim() == 2, "x must be 2-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  x = x.contiguous();
  const int64_t M = x.size(0), N = qs.size(0);
  const Weights w = checked_weights(qs, qh, scale, min, bits, group, offset, x.size(1));
  auto out = torch::empty({M, N}, x.options());
  if (M == 0) return out;
  if (x.scalar_type() == at::kFloat) {
    quant_matmul_impl<float>(x.data_ptr<float>(), w, bias_ptr<float>(bias, at::kFloat, N), out.data_ptr<float>(), M, N);
  } else {
    quant_matmul_impl<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), w, bias_ptr<c10::BFloat16>(bias, at::kBFloat16, N),
                                     out.data_ptr<c10::BFloat16>(), M, N);
  }
  return out;
}

// The whole weight [N, K] in float32 or bfloat16 (for products with many rows, which a dense GEMM
// computes faster than the int8 dot products do).
torch::Tensor quant_dequantize(torch::Tensor qs, c10::optional<torch::Tensor> qh, torch::Tensor scale,
                               c10::optional<torch::Tensor> min, int64_t bits, int64_t group, double offset,
                               int64_t K, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dtype must be float32 or bfloat16");
  const Weights w = checked_weights(qs, qh, scale, min, bits, group, offset, K);
  const int64_t N = qs.size(0);
  auto out = torch::empty({N, K}, qs.options().dtype(dtype));
  if (dtype == at::kFloat) dequantize_impl<float>(w, out.data_ptr<float>(), N);
  else dequantize_impl<c10::BFloat16>(w, out.data_ptr<c10::BFloat16>(), N);
  return out;
}

bool has_quant_matmul() { return true; }
bool has_amx_matmul() { return loom_quant::amx_ready(); }
#else
torch::Tensor quant_matmul(torch::Tensor x, torch::Tensor, c10::optional<torch::Tensor>, torch::Tensor,
                           c10::optional<torch::Tensor>, int64_t, int64_t, double, c10::optional<torch::Tensor>) {
  TORCH_CHECK(false, "built without AVX2/FMA/F16C");
  return x;
}
torch::Tensor quant_dequantize(torch::Tensor qs, c10::optional<torch::Tensor>, torch::Tensor,
                               c10::optional<torch::Tensor>, int64_t, int64_t, double, int64_t, at::ScalarType) {
  TORCH_CHECK(false, "built without AVX2/FMA/F16C");
  return qs;
}
bool has_quant_matmul() { return false; }
bool has_amx_matmul() { return false; }
#endif
