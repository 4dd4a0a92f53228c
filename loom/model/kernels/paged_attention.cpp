// Decode attention over a paged KV cache, for CPUs.
//
// One query token per sequence attends to its sequence's keys, read in place from the
// block-table-addressed cache (no gather copy). Work is split over (sequence, kv head) pairs so
// each K/V row is read once and shared by the query heads of its group (GQA); the bf16 fast path
// also splits a long sequence's keys into chunks (kKeyChunk). Scores and the output accumulate in
// fp32 whatever the cache dtype.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cpu_check.h"
#include "int8_kv.h"
#include "static_count.h"
#include "ops.h"

#include <algorithm>
#include <atomic>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include "avx512_bf16.h"
#endif

namespace {

#if defined(__AVX512F__) && defined(__AVX512BF16__)
using loom_simd::load_bf16;
using loom_simd::load_bh;
using loom_simd::exp_ps;
using loom_simd::reduce16;
using loom_simd::load16;
using loom_simd::store16;

// Softmax numerators of `rows` rows of `stride` scores (a multiple of 16, padded with -inf, which
// contributes exp(-inf) = 0), in place; row_max[r] and row_sum[r] = the row's largest score and the
// sum of its numerators (row_max may be null). Weights below e^-64 of the row's largest are flushed
// to 0: they are far below fp32's resolution of the sum, and exp_ps would return ~1e-38 for them,
// whose products with the values are denormals (a microcode assist each, which made a peaked
// softmax 10x slower). A row of -inf only (a verification row that sees no key of a chunk) gets
// weights 0 and sum 0.
void softmax_rows(float* scores, int64_t rows, int64_t stride, float* row_max, float* row_sum) {
  const __m512 cutoff = _mm512_set1_ps(-64.f);
  for (int64_t g = 0; g < rows; ++g) {
    float* sc = scores + g * stride;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < stride; i += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sc + i));
    const float largest = _mm512_reduce_max_ps(mx);
    if (row_max) row_max[g] = largest;
    const __m512 vmax = _mm512_set1_ps(largest);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < stride; i += 16) {
      const __m512 x = _mm512_sub_ps(_mm512_loadu_ps(sc + i), vmax);  // NaN for -inf - -inf: not > cutoff
      const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, cutoff, _CMP_GT_OQ), exp_ps(x));
      _mm512_storeu_ps(sc + i, e);
      sum = _mm512_add_ps(sum, e);
    }
    row_sum[g] = _mm512_reduce_add_ps(sum);
  }
}

// softmax_rows with inv[r] = 1 / the row's sum.
void softmax_padded(float* scores, int64_t rows, int64_t stride, float* inv) {
  softmax_rows(scores, rows, stride, nullptr, inv);
  for (int64_t g = 0; g < rows; ++g) inv[g] = 1.f / inv[g];
}

// Pass 2 for G query heads of a group: acc[g * nv + j] = sum_t w[g * stride + t] * rows[t][16j..16j+16)
// over n tokens. The G x CH accumulators of CH 16-lane chunks stay in registers (compile-time
// sizes), so each token costs CH loads and G x CH FMAs and no accumulator traffic through memory.
template <int G, int CH, typename V>
void weighted_rows(const V* const* rows, const float* w, int64_t stride, int64_t n, int64_t nv, __m512* acc) {
  for (int64_t j0 = 0; j0 < nv; j0 += CH) {
    __m512 a[G][CH];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < CH; ++c) a[g][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
      __m512 v[CH];
      for (int c = 0; c < CH; ++c) v[c] = load16(rows[t] + (j0 + c) * 16);  // an int8 row's scale is in w
      for (int g = 0; g < G; ++g) {
        const __m512 p = _mm512_set1_ps(w[g * stride + t]);
        for (int c = 0; c < CH; ++c) a[g][c] = _mm512_fmadd_ps(p, v[c], a[g][c]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < CH; ++c) acc[g * nv + j0 + c] = a[g][c];
  }
}

template <int G, typename V>
void weighted_rows_of(const V* const* rows, const float* w, int64_t stride, int64_t n, int64_t nv, __m512* acc) {
  if (nv % 4 == 0) weighted_rows<G, 4>(rows, w, stride, n, nv, acc);
  else weighted_rows<G, 2>(rows, w, stride, n, nv, acc);  // head_dim is a multiple of 32: nv is even
}

// All `group` heads, up to 6 at a time (6 x 4 accumulators + 4 values fit AVX-512's 32 registers).
template <typename V>
void weighted_values(const V* const* rows, const float* w, int64_t stride, int64_t n, int64_t nv, int64_t group,
                     __m512* acc) {
  for (int64_t g0 = 0; g0 < group; g0 += 6) {
    const float* wg = w + g0 * stride;
    __m512* ag = acc + g0 * nv;
    with_count<6>(group - g0, [&](auto g) {
      weighted_rows_of<decltype(g)::value>(rows, wg, stride, n, nv, ag);
    });
  }
}

// Rows that verify draft tokens: runs of consecutive rows of one sequence (the same block table,
// each seeing one more key than the row before). Such a run is served as one task per KV head, its
// keys and values read once for all its rows (each row's later keys masked): on a CPU a row of its
// own would read the whole context again. Returns (first row, rows) per run; every run is 1 row
// with a sliding window.
std::vector<std::pair<int64_t, int64_t>> sequence_runs(const int32_t* block_tables, const int32_t* context_lens,
                                                       int64_t num_seqs, int64_t max_blocks, int64_t block_size,
                                                       int64_t window) {
  std::vector<std::pair<int64_t, int64_t>> runs;
  for (int64_t s = 0; s < num_seqs;) {
    int64_t r = 1;
    while (window <= 0 && s + r < num_seqs && context_lens[s + r] == context_lens[s + r - 1] + 1 &&
           std::memcmp(block_tables + s * max_blocks, block_tables + (s + r) * max_blocks,
                       sizeof(int32_t) * std::min<int64_t>(max_blocks, (context_lens[s + r] + block_size - 1) / block_size)) == 0)
      ++r;
    runs.emplace_back(s, r);
    s += r;
  }
  return runs;
}

// Scores of 16 keys (rows of 32 * NQ bf16 from kb, a whole 16-key group) against one query head,
// lane j for key j: the 16 x NQ dot products are unrolled with an accumulator per key, so they
// run side by side (a loop over keys with a run-time NQ made one product at a time, which cost a
// verification run of 9 rows at 1,000 tokens of context as much as its matrix products). Each
// key's sum is made in the same order as in the general loop below it.
template <int NQ>
__m512 full_key_dots16(const c10::BFloat16* kb, const __m512bh* qv) {
  __m512 dots[16];
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) {
    __m512 d = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int c = 0; c < NQ; ++c) d = _mm512_dpbf16_ps(d, load_bh(kb + j * 32 * NQ + c * 32), qv[c]);
    dots[j] = d;
  }
  return reduce16(dots);
}
using KeyDots16 = __m512 (*)(const c10::BFloat16*, const __m512bh*);

// Keys per task of the bf16 fast path. A sequence's keys are split at multiples of this position
// whatever else is in the batch, so a row's output depends on its own length only. At batch 1 a
// long sequence is then several tasks, where one task per KV head left a thread idle (the default
// model's 3 KV heads on 2 threads).
constexpr int64_t kKeyChunk = 512;

// One task of the bf16 fast path: the rows of run `run` (sequence_runs) against KV head `h`, over
// keys [t0, t1). A run within one chunk writes its output. The chunks of a longer run leave, per
// head, the unnormalised weighted values, the largest score and the sum of weights at float offset
// `partial` of the partials (combine_chunks sums them).
struct ChunkTask {
  int64_t run, h, t0, t1, partial;  // partial: -1 for a run within one chunk
  int64_t split;  // the run's entry in the split runs, or -1
};

// A run longer than one chunk, against one KV head: its chunks' partials start at `partial`. The
// task that finishes its last chunk (`done` counts them) combines them, so the step needs no
// second parallel region.
struct SplitRun {
  int64_t chunks = 0, partial = 0;
  std::atomic<int64_t> done{0};
};

// The chunks of a split run, for one KV head: per head, out = (sum_c f_c acc_c) / (sum_c f_c s_c),
// chunks in order, with f_c = exp(m_c - max m). A chunk where a row sees no key (s = 0) and one
// below e^-64 of the largest get f = 0. With one chunk that counts this is acc * (1 / s) bit for
// bit, as an unsplit run computes it: a verification row's output is its output alone.
void combine_chunks(const float* partial, int64_t chunks, int64_t heads, int64_t head_dim, c10::BFloat16* const* outs) {
  const int64_t nv = head_dim / 16, slot = heads * (head_dim + 2);
  for (int64_t g = 0; g < heads; ++g) {
    const auto max_of = [&](int64_t c) { return partial[c * slot + heads * head_dim + g]; };
    const auto sum_of = [&](int64_t c) { return partial[c * slot + heads * head_dim + heads + g]; };
    float m = -INFINITY;
    for (int64_t c = 0; c < chunks; ++c) m = std::max(m, max_of(c));
    float total = 0.f;
    __m512 acc[16];  // nv <= 16 (head_dim <= 256)
    for (int64_t j = 0; j < nv; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const float d = max_of(c) - m;
      const float f = sum_of(c) > 0.f && d > -64.f ? std::exp(d) : 0.f;
      total = std::fma(f, sum_of(c), total);
      const __m512 vf = _mm512_set1_ps(f);
      const float* a = partial + c * slot + g * head_dim;
      for (int64_t j = 0; j < nv; ++j) acc[j] = _mm512_fmadd_ps(vf, _mm512_loadu_ps(a + j * 16), acc[j]);
    }
    const __m512 vinv = _mm512_set1_ps(1.f / total);
    for (int64_t j = 0; j < nv; ++j) store16(outs[g] + j * 16, _mm512_mul_ps(acc[j], vinv));
  }
}

// The bf16 fast path (head_dim a multiple of 32, up to 256). Scores: VDPBF16PS dot products of
// up to 16 keys of a block at once, reduced together; softmax with a vectorised exp; values
// accumulate in fp32. Keys of one head are contiguous within a block (head-major layout). The
// rows of a run (sequence_runs) are served together as if they were more query heads of the group;
// each row's scores past its own length are -inf and its weights there 0, so it gets exactly what
// it would get alone. Tasks are (run, KV head, chunk of kKeyChunk keys).
void decode_attention_bf16_avx512(const c10::BFloat16* q, const c10::BFloat16* k_cache,
                                  const c10::BFloat16* v_cache, const int32_t* block_tables,
                                  const int32_t* context_lens, c10::BFloat16* out, int64_t num_seqs,
                                  int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                                  int64_t max_blocks, float scale, int64_t window, int64_t q_row) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t nq = head_dim / 32, nv = head_dim / 16;
  const auto runs = sequence_runs(block_tables, context_lens, num_seqs, max_blocks, block_size, window);
  KeyDots16 key_dots16 = nullptr;
  with_count<8>(nq, [&](auto n) { key_dots16 = &full_key_dots16<decltype(n)::value>; });
  const auto out_row = [&](int64_t s0, int64_t h, int64_t g) {  // head g of a run's rows against KV head h
    return out + ((s0 + g / group) * num_heads + h * group + g % group) * head_dim;
  };
  std::vector<ChunkTask> tasks;
  int64_t num_splits = 0, partial_floats = 0;
  for (int64_t run = 0; run < static_cast<int64_t>(runs.size()); ++run) {
    const auto [s0, nr] = runs[run];
    const int64_t len = context_lens[s0 + nr - 1];  // the run's last row sees the most keys
    const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
    const int64_t c0 = first / kKeyChunk, c1 = std::max<int64_t>(c0 + 1, (len + kKeyChunk - 1) / kKeyChunk);
    const int64_t slot = nr * group * (head_dim + 2);
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      const bool split = c1 - c0 > 1;
      for (int64_t c = c0; c < c1; ++c) {
        tasks.push_back({run, h, std::max(first, c * kKeyChunk), std::min(len, (c + 1) * kKeyChunk),
                         split ? partial_floats : -1, split ? num_splits : -1});
        if (split) partial_floats += slot;
      }
      num_splits += split;
    }
  }
  std::vector<SplitRun> splits(num_splits);
  for (const ChunkTask& tk : tasks)
    if (tk.split >= 0 && splits[tk.split].chunks++ == 0) splits[tk.split].partial = tk.partial;
  const std::unique_ptr<float[]> partials(new float[partial_floats]);  // every slot is written before it is read
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<__m512bh> qv;
    std::vector<__m512> acc;
    std::vector<float> scores;  // [rows x group][n padded to 16]
    std::vector<float> row_max, row_sum;
    std::vector<const c10::BFloat16*> rows;  // each visible token's value row
    for (int64_t task = begin; task < end; ++task) {
      const ChunkTask& tk = tasks[task];
      const auto [s0, nr] = runs[tk.run];
      const int64_t h = tk.h, heads = nr * group, t0 = tk.t0, t1 = tk.t1;
      const int64_t n = t1 - t0, stride = (n + 15) / 16 * 16;
      if (n <= 0) {  // no key at all (an empty sequence): a run within one chunk
        for (int64_t g = 0; g < heads; ++g) std::fill(out_row(s0, h, g), out_row(s0, h, g) + head_dim, c10::BFloat16(0.f));
        continue;
      }
      qv.resize(heads * nq);
      acc.resize(heads * nv);
      for (int64_t r = 0; r < nr; ++r) {
        const c10::BFloat16* qs = q + (s0 + r) * q_row + h * group * head_dim;
        for (int64_t i = 0; i < group * nq; ++i) qv[r * group * nq + i] = load_bh(qs + i * 32);
      }
      scores.assign(heads * stride, -INFINITY);
      const int32_t* table = block_tables + s0 * max_blocks;
      const __m512 vscale = _mm512_set1_ps(scale);
      // Pass 1: scores, a block (or part of one) at a time, at most 16 keys per reduction.
      for (int64_t t = t0; t < t1;) {
        const int64_t off = t % block_size;
        const int64_t cnt = std::min<int64_t>({16, block_size - off, t1 - t});
        const c10::BFloat16* kb =
            k_cache + (((int64_t)table[t / block_size] * num_kv_heads + h) * block_size + off) * head_dim;
        for (int64_t r = 0; r < nr; ++r) {
          // this row sees keys up to its own length
          const int64_t visible = std::min<int64_t>(cnt, context_lens[s0 + r] - t);
          if (visible <= 0) continue;
          const __mmask16 valid = (__mmask16)((1u << visible) - 1);
          for (int64_t g = r * group; g < (r + 1) * group; ++g) {
            __m512 sums;
            if (visible == 16) {
              sums = key_dots16(kb, qv.data() + g * nq);
            } else {
              __m512 dots[16];
              for (int64_t j = 0; j < 16; ++j) {
                __m512 d = _mm512_setzero_ps();
                if (j < visible)
                  for (int64_t c = 0; c < nq; ++c) d = _mm512_dpbf16_ps(d, load_bh(kb + j * head_dim + c * 32), qv[g * nq + c]);
                dots[j] = d;
              }
              sums = reduce16(dots);
            }
            float* dst = scores.data() + g * stride + (t - t0);
            _mm512_mask_storeu_ps(dst, valid, _mm512_mul_ps(sums, vscale));
          }
        }
        t += cnt;
      }
      row_max.resize(heads);
      row_sum.resize(heads);
      softmax_rows(scores.data(), heads, stride, row_max.data(), row_sum.data());
      // Pass 2: weighted sum of values in fp32.
      rows.resize(n);
      for (int64_t t = t0; t < t1; ++t)
        rows[t - t0] =
            v_cache + (((int64_t)table[t / block_size] * num_kv_heads + h) * block_size + t % block_size) * head_dim;
      weighted_values(rows.data(), scores.data(), stride, n, nv, heads, acc.data());
      if (tk.partial >= 0) {
        float* p = partials.get() + tk.partial;
        for (int64_t g = 0; g < heads; ++g)
          for (int64_t j = 0; j < nv; ++j) _mm512_storeu_ps(p + g * head_dim + j * 16, acc[g * nv + j]);
        std::copy(row_max.begin(), row_max.end(), p + heads * head_dim);
        std::copy(row_sum.begin(), row_sum.end(), p + heads * head_dim + heads);
        SplitRun& sp = splits[tk.split];
        if (sp.done.fetch_add(1, std::memory_order_acq_rel) + 1 == sp.chunks) {  // the last chunk: combine
          std::vector<c10::BFloat16*> outs(heads);
          for (int64_t g = 0; g < heads; ++g) outs[g] = out_row(s0, h, g);
          combine_chunks(partials.get() + sp.partial, sp.chunks, heads, head_dim, outs.data());
        }
        continue;
      }
      for (int64_t g = 0; g < heads; ++g) {
        const __m512 vinv = _mm512_set1_ps(1.f / row_sum[g]);
        c10::BFloat16* o = out_row(s0, h, g);
        for (int64_t j = 0; j < nv; ++j) store16(o + j * 16, _mm512_mul_ps(acc[g * nv + j], vinv));
      }
    }
  });
}
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)

// Scores (before the query's and the softmax scale) of up to 16 keys (those in `valid`, from offset
// `off` of a block-head slab of the int8 cache) for G query heads at once. Keys are stored
// pair-major (dims 2i and 2i+1 of the slab's tokens in one 2 x block_size run), so one load and sign
// extension per pair of dims serves every head (VPDPWSSD against the head's broadcast int16 pair)
// and the lanes come out as keys, with no horizontal reduction. Each group of kInt8KeyGroup dims
// has its own scale per key (k_scales: [groups][block_size] for the slab), applied to its integer
// partial sums: out[g] lane j = sum_group scale_j,group * sum_{d in group} k_j[d] q_g[d].
template <int G>
void int8_key_dots(const int8_t* slab, const at::Half* k_scales, int64_t block_size, int64_t off, __mmask16 valid,
                   int64_t pairs, const int32_t* qpairs, __m512* out) {
  __m512 f[G];
  for (int g = 0; g < G; ++g) f[g] = _mm512_setzero_ps();
  constexpr int64_t group_pairs = kInt8KeyGroup / 2;
  for (int64_t i0 = 0; i0 < pairs; i0 += group_pairs) {
    __m512i a[G];
    for (int g = 0; g < G; ++g) a[g] = _mm512_setzero_si512();
    for (int64_t i = i0; i < i0 + group_pairs; ++i) {
      const __m512i k = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi16(valid, slab + (i * block_size + off) * 2));
      for (int g = 0; g < G; ++g) a[g] = _mm512_dpwssd_epi32(a[g], k, _mm512_set1_epi32(qpairs[g * pairs + i]));
    }
    const __m512 scale =
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, k_scales + (i0 / group_pairs) * block_size + off));
    for (int g = 0; g < G; ++g) f[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[g]), scale, f[g]);
  }
  for (int g = 0; g < G; ++g) out[g] = f[g];
}

// All `group` heads, up to 8 at a time.
void int8_key_dots_all(const int8_t* slab, const at::Half* k_scales, int64_t block_size, int64_t off, __mmask16 valid,
                       int64_t pairs, const int32_t* qpairs, int64_t group, __m512* out) {
  for (int64_t g0 = 0; g0 < group; g0 += 8) {
    const int32_t* qp = qpairs + g0 * pairs;
    __m512* o = out + g0;
    with_count<8>(group - g0, [&](auto g) {
      int8_key_dots<decltype(g)::value>(slab, k_scales, block_size, off, valid, pairs, qp, o);
    });
  }
}

// The int8 cache (int8 codes; keys pair-major within a block with an fp16 scale per token, head and
// group of 16 dims, values token-major with one per token and head; head_dim a multiple of 32, up
// to 256). Each query head becomes int16 codes with one fp32 scale (16 bits: finer than bf16), so a
// score is integer dot products scaled per key group (int8_key_dots) times the query's and the
// softmax scale. Values are widened to fp32 in registers, their scale folded into the softmax
// weight. q and the output are fp32 or bf16.
template <typename T>
void decode_attention_int8_avx512(const T* q, const int8_t* k_cache, const int8_t* v_cache, const at::Half* k_scales,
                                  const at::Half* v_scales, const int32_t* block_tables, const int32_t* context_lens,
                                  T* out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                  int64_t block_size, int64_t max_blocks, float scale, int64_t window, int64_t q_row) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t nk = head_dim / 32, nv = head_dim / 16, pairs = head_dim / 2;
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> qpairs(group * pairs);  // each head's int16 codes, two per int32
    std::vector<__m512> dots(group);
    std::vector<float> qscale(group), inv(group);
    std::vector<__m512> acc(group * nv);
    std::vector<float> scores;  // [group][n padded to 16]
    std::vector<const int8_t*> rows;  // each visible token's value row
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / num_kv_heads, h = task % num_kv_heads;
      const int64_t len = context_lens[s];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first, stride = (n + 15) / 16 * 16;
      T* o = out + (s * num_heads + h * group) * head_dim;
      if (n <= 0) {
        std::fill(o, o + group * head_dim, T(0.f));
        continue;
      }
      const T* qs = q + s * q_row + h * group * head_dim;
      for (int64_t g = 0; g < group; ++g) {
        const T* qg = qs + g * head_dim;
        __m512 amax = _mm512_setzero_ps();
        for (int64_t i = 0; i < nv; ++i) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(qg + i * 16)));
        const float m = _mm512_reduce_max_ps(amax);
        qscale[g] = m / 32767.f * scale;
        const __m512 to_codes = _mm512_set1_ps(m > 0.f ? 32767.f / m : 0.f);
        for (int64_t c = 0; c < nk; ++c) {
          const __m256i lo = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(load16(qg + c * 32), to_codes)));
          const __m256i hi = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(load16(qg + c * 32 + 16), to_codes)));
          _mm512_storeu_si512(qpairs.data() + g * pairs + c * 16, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
        }
      }
      scores.assign(group * stride, -INFINITY);
      const int32_t* table = block_tables + s * max_blocks;
      // Pass 1: scores, at most 16 keys of one block at a time.
      for (int64_t t = first; t < len;) {
        const int64_t off = t % block_size;
        const int64_t cnt = std::min<int64_t>({16, block_size - off, len - t});
        const int64_t slab = ((int64_t)table[t / block_size] * num_kv_heads + h) * block_size;
        const __mmask16 valid = (__mmask16)((1u << cnt) - 1);
        int8_key_dots_all(k_cache + slab * head_dim, k_scales + slab * (head_dim / kInt8KeyGroup), block_size, off,
                          valid, pairs, qpairs.data(), group, dots.data());
        for (int64_t g = 0; g < group; ++g) {
          const __m512 sc = _mm512_mul_ps(dots[g], _mm512_set1_ps(qscale[g]));
          _mm512_mask_storeu_ps(scores.data() + g * stride + (t - first), valid, sc);
        }
        t += cnt;
      }
      softmax_padded(scores.data(), group, stride, inv.data());
      // Pass 2: weighted sum of values in fp32, each token's scale folded into its weights.
      rows.resize(n);
      for (int64_t t = first; t < len; ++t) {
        const int64_t slot = ((int64_t)table[t / block_size] * num_kv_heads + h) * block_size + t % block_size;
        rows[t - first] = v_cache + slot * head_dim;
        const float vscale = float(v_scales[slot]);
        for (int64_t g = 0; g < group; ++g) scores[g * stride + (t - first)] *= vscale;
      }
      weighted_values(rows.data(), scores.data(), stride, n, nv, group, acc.data());
      for (int64_t g = 0; g < group; ++g) {
        const __m512 vinv = _mm512_set1_ps(inv[g]);
        for (int64_t j = 0; j < nv; ++j) store16(o + g * head_dim + j * 16, _mm512_mul_ps(acc[g * nv + j], vinv));
      }
    }
  });
}
#endif

// KIVI's int4/int2 cache (see KiviKVCache in kv_cache.py). 16 codes of BITS bits, packed 8 / BITS
// to a byte with the first in the lowest bits, as 16 fp32 lanes: one broadcast of their 64 (int4)
// or 32 (int2) bits, a variable shift per lane and a mask.
template <int BITS>
inline __m512 kivi_codes16(const uint8_t* p) {
  __m512i x, shifts;
  if constexpr (BITS == 4) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    x = _mm512_permutexvar_epi32(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                                 _mm512_castsi128_si512(_mm_cvtsi64_si128((long long)w)));
    shifts = _mm512_set_epi32(28, 24, 20, 16, 12, 8, 4, 0, 28, 24, 20, 16, 12, 8, 4, 0);
  } else {
    uint32_t w;
    std::memcpy(&w, p, 4);
    x = _mm512_set1_epi32((int)w);
    shifts = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  }
  return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(x, shifts), _mm512_set1_epi32((1 << BITS) - 1)));
}

// Scores of 16 keys of a quantized block (channel-major codes, `row_bytes` per channel) for G heads:
// with k = code * scale_d + zero_d per channel, q.k = sum_d (q_d scale_d) code_d + sum_d q_d zero_d,
// so each head's query is scaled per channel (qs) and its zero-point term (bias) is one number per
// block. One expansion of a channel's 16 codes serves every head, and lanes come out as keys.
template <int BITS, int G>
void kivi_key_dots(const uint8_t* codes, int64_t row_bytes, int64_t head_dim, const float* qs, const float* bias,
                   __m512* out) {
  __m512 acc[G];
  for (int g = 0; g < G; ++g) acc[g] = _mm512_set1_ps(bias[g]);
  for (int64_t d = 0; d < head_dim; ++d) {
    const __m512 c = kivi_codes16<BITS>(codes + d * row_bytes);
    for (int g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(qs[g * head_dim + d]), c, acc[g]);
  }
  for (int g = 0; g < G; ++g) out[g] = acc[g];
}

// Pass 2 over quantized value rows for G heads and CH 16-channel chunks from j0: acc += sum_t
// (p_t scale_t,k) code_t (k: the chunk's channel group); the zero points' share, sum_t p_t zero_t,k,
// is added per group by the caller.
template <int BITS, int G, int CH>
void kivi_value_rows(const uint8_t* const* rows, const at::Half* const* scales, const float* w, int64_t stride,
                     int64_t n, int64_t j0, int64_t chunks_per_group, __m512* acc, int64_t nv) {
  __m512 a[G][CH];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < CH; ++c) a[g][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    __m512 v[CH];
    float s[CH];
    for (int c = 0; c < CH; ++c) {
      v[c] = kivi_codes16<BITS>(rows[t] + (j0 + c) * 2 * BITS);
      s[c] = float(scales[t][(j0 + c) / chunks_per_group]);
    }
    for (int g = 0; g < G; ++g) {
      const float p = w[g * stride + t];
      for (int c = 0; c < CH; ++c) a[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(p * s[c]), v[c], a[g][c]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < CH; ++c) acc[g * nv + j0 + c] = a[g][c];
}

// Decode attention over a KIVI cache: a row of context length L reads its first L / R * R tokens from
// the quantized blocks and the rest from its residual slot (plain rows of q's dtype). q and the output
// are fp32 or bf16; head_dim a multiple of 32 up to 256, block_size a multiple of 16.
template <int BITS, typename T>
void decode_attention_kivi_avx512(const T* q, const uint8_t* k_codes, const uint8_t* v_codes, const at::Half* k_scales,
                                  const at::Half* k_zeros, const at::Half* v_scales, const at::Half* v_zeros,
                                  const T* res_k, const T* res_v, const int32_t* block_tables,
                                  const int32_t* context_lens, const int32_t* slots, T* out, int64_t num_seqs,
                                  int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                                  int64_t max_blocks, int64_t residual_tokens, int64_t value_group, float scale,
                                  int64_t window, int64_t q_row) {
  const int64_t group = num_heads / num_kv_heads, nv = head_dim / 16, vgroups = head_dim / value_group;
  const int64_t key_row = block_size * BITS / 8, value_row = head_dim * BITS / 8;
  const int64_t res_blocks = residual_tokens / block_size;
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * head_dim), qs(group * head_dim), bias(group), inv(group), zsum(group * vgroups);
    std::vector<__m512> dots(group), acc(group * nv), racc(group * nv);
    std::vector<float> scores;  // [group][n padded to 16]
    std::vector<const uint8_t*> vrows;
    std::vector<const at::Half*> vscale_rows;
    std::vector<const T*> rrows;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / num_kv_heads, h = task % num_kv_heads;
      const int64_t len = context_lens[s];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first, stride = (n + 15) / 16 * 16;
      const int64_t sealed = len / residual_tokens * residual_tokens;
      T* o = out + (s * num_heads + h * group) * head_dim;
      if (n <= 0) {
        std::fill(o, o + group * head_dim, T(0.f));
        continue;
      }
      const T* qh = q + s * q_row + h * group * head_dim;
      for (int64_t i = 0; i < group * head_dim; ++i) qf[i] = float(qh[i]) * scale;
      scores.assign(group * stride, -INFINITY);
      const int32_t* table = block_tables + s * max_blocks;
      // Pass 1a: the quantized blocks, 16 keys at a time.
      for (int64_t b = first / block_size; b * block_size < sealed; ++b) {
        const int64_t slab = (int64_t)table[b] * num_kv_heads + h;
        const at::Half* ks = k_scales + slab * head_dim;
        const at::Half* kz = k_zeros + slab * head_dim;
        for (int64_t g = 0; g < group; ++g) {
          __m512 bsum = _mm512_setzero_ps();
          for (int64_t c = 0; c < nv; ++c) {
            const __m512 qv = _mm512_loadu_ps(qf.data() + g * head_dim + c * 16);
            const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ks + c * 16)));
            const __m512 zr = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kz + c * 16)));
            _mm512_storeu_ps(qs.data() + g * head_dim + c * 16, _mm512_mul_ps(qv, sc));
            bsum = _mm512_fmadd_ps(qv, zr, bsum);
          }
          bias[g] = _mm512_reduce_add_ps(bsum);
        }
        const uint8_t* codes = k_codes + slab * head_dim * key_row;
        for (int64_t t0 = 0; t0 < block_size; t0 += 16) {
          const int64_t pos = b * block_size + t0;
          for (int64_t g0 = 0; g0 < group; g0 += 8) {
            with_count<8>(group - g0, [&](auto gc) {
              kivi_key_dots<BITS, decltype(gc)::value>(codes + t0 * BITS / 8, key_row, head_dim,
                                                       qs.data() + g0 * head_dim, bias.data() + g0, dots.data() + g0);
            });
          }
          // Keys before `first` (a sliding window) are masked off; the store never touches them.
          const __mmask16 valid = pos >= first ? (__mmask16)0xFFFF : (__mmask16)(0xFFFFu << (first - pos));
          for (int64_t g = 0; g < group; ++g)
            _mm512_mask_storeu_ps(scores.data() + g * stride + (pos - first), valid, dots[g]);
        }
      }
      // Pass 1b: the residual, plain rows.
      const int64_t res0 = std::max(sealed, first);
      const int64_t slot_block = (int64_t)slots[s] * res_blocks;
      rrows.resize(std::max<int64_t>(len - res0, 0));
      for (int64_t t = res0; t < len; ++t)
        rrows[t - res0] = res_k + (((slot_block + (t - sealed) / block_size) * num_kv_heads + h) * block_size +
                                   t % block_size) * head_dim;
      for (int64_t t0 = res0; t0 < len; t0 += 16) {
        const int64_t cnt = std::min<int64_t>(16, len - t0);
        for (int64_t g = 0; g < group; ++g) {
          __m512 d16[16];
          for (int64_t j = 0; j < 16; ++j) {
            __m512 d = _mm512_setzero_ps();
            if (j < cnt)
              for (int64_t c = 0; c < nv; ++c)
                d = _mm512_fmadd_ps(load16(rrows[t0 - res0 + j] + c * 16), _mm512_loadu_ps(qf.data() + g * head_dim + c * 16), d);
            d16[j] = d;
          }
          _mm512_mask_storeu_ps(scores.data() + g * stride + (t0 - first), (__mmask16)((1u << cnt) - 1), reduce16(d16));
        }
      }
      softmax_padded(scores.data(), group, stride, inv.data());
      // Pass 2a: quantized values.
      const int64_t nq = std::max<int64_t>(sealed - first, 0);
      vrows.resize(nq);
      vscale_rows.resize(nq);
      std::fill(zsum.begin(), zsum.end(), 0.f);
      for (int64_t t = first; t < first + nq; ++t) {
        const int64_t row = ((int64_t)table[t / block_size] * num_kv_heads + h) * block_size + t % block_size;
        vrows[t - first] = v_codes + row * value_row;
        vscale_rows[t - first] = v_scales + row * vgroups;
        const at::Half* vz = v_zeros + row * vgroups;
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * stride + (t - first)];
          for (int64_t k = 0; k < vgroups; ++k) zsum[g * vgroups + k] += p * float(vz[k]);
        }
      }
      const int64_t chunks_per_group = value_group / 16;
      for (int64_t j0 = 0; j0 < nv; j0 += 4) {
        const int64_t ch = std::min<int64_t>(4, nv - j0);
        for (int64_t g0 = 0; g0 < group; g0 += 6) {
          with_count<6>(group - g0, [&](auto gc) {
            constexpr int G = decltype(gc)::value;
            const float* w = scores.data() + g0 * stride;
            __m512* a = acc.data() + g0 * nv;
            if (ch == 4) kivi_value_rows<BITS, G, 4>(vrows.data(), vscale_rows.data(), w, stride, nq, j0, chunks_per_group, a, nv);
            else kivi_value_rows<BITS, G, 2>(vrows.data(), vscale_rows.data(), w, stride, nq, j0, chunks_per_group, a, nv);
          });
        }
      }
      // Pass 2b: the residual's values.
      const int64_t nr = len - res0;
      for (int64_t t = res0; t < len; ++t)
        rrows[t - res0] = res_v + (((slot_block + (t - sealed) / block_size) * num_kv_heads + h) * block_size +
                                   t % block_size) * head_dim;
      if (nr > 0) weighted_values(rrows.data(), scores.data() + (res0 - first), stride, nr, nv, group, racc.data());
      for (int64_t g = 0; g < group; ++g) {
        const __m512 vinv = _mm512_set1_ps(inv[g]);
        for (int64_t j = 0; j < nv; ++j) {
          __m512 r = _mm512_add_ps(acc[g * nv + j], _mm512_set1_ps(zsum[g * vgroups + j / chunks_per_group]));
          if (nr > 0) r = _mm512_add_ps(r, racc[g * nv + j]);
          store16(o + g * head_dim + j * 16, _mm512_mul_ps(r, vinv));
        }
      }
    }
  });
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
// exp of 8 floats (Cephes' polynomial, relative error ~1e-7); inputs below -88 give ~1e-38.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

// Replaces the n scores at sc by exp(score - max) and returns their sum (the softmax's numerators
// and denominator); vectorised where AVX2 is, since a scalar exp per score costs more than the dots.
inline float softmax_numerators(float* sc, int64_t n) {
  float mx = -INFINITY;
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, sc[i]);
  float sum = 0.f;
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 vmax = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + i), vmax));
    _mm256_storeu_ps(sc + i, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vsum);
  for (float v : lanes) sum += v;
#endif
  for (; i < n; ++i) {
    sc[i] = std::exp(sc[i] - mx);
    sum += sc[i];
  }
  return sum;
}

// The portable kernel: any cache element C (the compute dtype, or int8 codes with fp16 scales:
// k_scales/v_scales, null for a plain cache; keys pair-major), converted to fp32 row by row.
template <typename T, typename C>
void decode_attention_kernel(const T* q, const C* k_cache, const C* v_cache, const at::Half* k_scales,
                             const at::Half* v_scales, const int32_t* block_tables, const int32_t* context_lens,
                             T* out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                             int64_t block_size, int64_t max_blocks, float scale, int64_t window, int64_t q_row) {
  const int64_t group = num_heads / num_kv_heads;
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * head_dim), kf(head_dim), acc(group * head_dim), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / num_kv_heads, h = task % num_kv_heads;
      const int64_t len = context_lens[s];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      T* o = out + (s * num_heads + h * group) * head_dim;
      if (n <= 0) {
        for (int64_t i = 0; i < group * head_dim; ++i) o[i] = T(0.f);
        continue;
      }
      const T* qs = q + s * q_row + h * group * head_dim;
      for (int64_t i = 0; i < group * head_dim; ++i) qf[i] = float(qs[i]) * scale;
      scores.resize(n * group);  // [group][n]: each head's scores contiguous, for the softmax
      const int32_t* table = block_tables + s * max_blocks;
      for (int64_t t = first; t < len; ++t) {
        const int64_t off = t % block_size;
        const int64_t slot = ((int64_t)table[t / block_size] * num_kv_heads + h) * block_size + off;
        if constexpr (std::is_same_v<C, int8_t>) {  // int8 keys: pair-major, a scale per group of dims
          const int8_t* slab = k_cache + (slot - off) * head_dim;
          const at::Half* ks = k_scales + (slot - off) * (head_dim / kInt8KeyGroup) + off;
          for (int64_t d = 0; d < head_dim; ++d)
            kf[d] = float(slab[((d >> 1) * block_size + off) * 2 + (d & 1)]) * float(ks[d / kInt8KeyGroup * block_size]);
        } else {
          const C* kr = k_cache + slot * head_dim;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) kf[d] = float(kr[d]);
        }
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qf.data() + g * head_dim;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * kf[d];
          scores[g * n + (t - first)] = dot;
        }
      }
      std::vector<float> sum(group, 0.f);
      for (int64_t g = 0; g < group; ++g) sum[g] = softmax_numerators(scores.data() + g * n, n);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = first; t < len; ++t) {
        const int64_t slot = ((int64_t)table[t / block_size] * num_kv_heads + h) * block_size + t % block_size;
        const C* vr = v_cache + slot * head_dim;
        const float vs = v_scales ? float(v_scales[slot]) : 1.f;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) kf[d] = float(vr[d]) * vs;
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * n + (t - first)];
          float* ag = acc.data() + g * head_dim;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) ag[d] += p * kf[d];
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        const float inv = 1.f / sum[g];
        for (int64_t d = 0; d < head_dim; ++d) o[g * head_dim + d] = T(acc[g * head_dim + d] * inv);
      }
    }
  });
}

}  // namespace

// q: [num_seqs, num_heads, head_dim]; caches: [num_blocks, num_kv_heads, block_size, head_dim]
// (a block holds each head's tokens contiguously, so one (sequence, head) task streams memory);
// block_tables: int32 [num_seqs, max_blocks]; context_lens: int32 [num_seqs] (keys visible,
// including the current token). window > 0 limits attention to the last `window` keys. A plain
// cache shares q's dtype; an int8 cache comes with fp16 k_scales [num_blocks, num_kv_heads,
// head_dim / 16, block_size] (one per token, head and group of 16 dims) and v_scales [num_blocks,
// num_kv_heads, block_size] (one per token and head).
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                               int64_t window, c10::optional<torch::Tensor> k_scales,
                               c10::optional<torch::Tensor> v_scales) {
  LOOM_CHECK_CPU(q);
  LOOM_CHECK_CPU(k_cache);
  LOOM_CHECK_CPU(v_cache);
  LOOM_CHECK_CPU(block_tables);
  LOOM_CHECK_CPU(context_lens);
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  const bool int8 = k_cache.scalar_type() == at::kChar;
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() && (int8 || q.scalar_type() == k_cache.scalar_type()),
              "q and a plain cache must share a dtype");
  TORCH_CHECK(int8 == k_scales.has_value() && int8 == v_scales.has_value(),
              "an int8 cache needs k_scales and v_scales, any other none");
  if (int8) check_int8_kv_scales(k_cache, *k_scales, *v_scales);
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && context_lens.scalar_type() == torch::kInt32,
              "block_tables and context_lens must be int32");
  // The queries may be a view into the step's fused q/k/v rows: only each row's heads must be packed.
  if (q.stride(2) != 1 || q.stride(1) != q.size(2)) q = q.contiguous();
  const int64_t q_row = q.stride(0);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  block_tables = block_tables.contiguous();
  context_lens = context_lens.contiguous();
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(1), block_size = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim && num_heads % num_kv_heads == 0, "head mismatch");
  auto out = torch::empty(q.sizes(), q.options());  // contiguous, whatever q's strides
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const int64_t max_blocks = block_tables.size(1);
  const at::Half* ks = int8 ? k_scales->data_ptr<at::Half>() : nullptr;
  const at::Half* vs = int8 ? v_scales->data_ptr<at::Half>() : nullptr;
  if (int8) {
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
    const auto run = [&](auto* q_ptr, auto* out_ptr) {
      decode_attention_int8_avx512(q_ptr, k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(), ks, vs, tables, lens,
                                   out_ptr, num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_blocks,
                                   (float)scale, window, q_row);
    };
    if (head_dim % 32 == 0 && head_dim <= 256 && q.scalar_type() == at::kBFloat16) {
      run(q.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>());
      return out;
    }
    if (head_dim % 32 == 0 && head_dim <= 256 && q.scalar_type() == at::kFloat) {
      run(q.data_ptr<float>(), out.data_ptr<float>());
      return out;
    }
#endif
  } else {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    if (q.scalar_type() == at::kBFloat16 && head_dim % 32 == 0 && head_dim <= 256) {
      decode_attention_bf16_avx512(q.data_ptr<c10::BFloat16>(), k_cache.data_ptr<c10::BFloat16>(),
                                   v_cache.data_ptr<c10::BFloat16>(), tables, lens, out.data_ptr<c10::BFloat16>(),
                                   num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_blocks, (float)scale,
                                   window, q_row);
      return out;
    }
#endif
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    const auto portable = [&](const auto* k, const auto* v) {
      decode_attention_kernel(q.data_ptr<scalar_t>(), k, v, ks, vs, tables, lens, out.data_ptr<scalar_t>(), num_seqs,
                              num_heads, num_kv_heads, head_dim, block_size, max_blocks, (float)scale, window, q_row);
    };
    if (int8) portable(k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>());
    else portable(k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>());
  });
  return out;
}


// The KIVI cache (int4 or int2, `bits`): k_codes [blocks, kv_heads, head_dim, block_size * bits / 8] and
// fp16 k_scales, k_zeros [blocks, kv_heads, head_dim]; v_codes [blocks, kv_heads, block_size, head_dim *
// bits / 8] and fp16 v_scales, v_zeros [blocks, kv_heads, block_size, head_dim / value_group]; the
// residual slots residual_k, residual_v [slots * residual_tokens / block_size, kv_heads, block_size,
// head_dim] in q's dtype, slots: int32 [num_seqs]. A row of context length L reads its first
// L / residual_tokens * residual_tokens keys from the blocks and the rest from its slot.
torch::Tensor decode_attention_kivi(torch::Tensor q, torch::Tensor k_codes, torch::Tensor v_codes,
                                    torch::Tensor k_scales, torch::Tensor k_zeros, torch::Tensor v_scales,
                                    torch::Tensor v_zeros, torch::Tensor residual_k, torch::Tensor residual_v,
                                    torch::Tensor block_tables, torch::Tensor context_lens, torch::Tensor slots,
                                    int64_t bits, int64_t residual_tokens, double scale, int64_t window) {
  for (const auto* t : {&q, &k_codes, &v_codes, &k_scales, &k_zeros, &v_scales, &v_zeros, &residual_k, &residual_v,
                        &block_tables, &context_lens, &slots})
    LOOM_CHECK_CPU(*t);
  TORCH_CHECK(bits == 4 || bits == 2, "a KIVI cache has 4- or 2-bit codes, not ", bits);
  TORCH_CHECK(q.dim() == 3 && k_codes.dim() == 4 && v_codes.dim() == 4 && residual_k.dim() == 4, "bad shapes");
  if (q.stride(2) != 1 || q.stride(1) != q.size(2)) q = q.contiguous();
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_blocks = k_codes.size(0), num_kv_heads = k_codes.size(1), block_size = v_codes.size(2);
  const int64_t vgroups = v_scales.size(3);
  TORCH_CHECK(num_heads % num_kv_heads == 0 && head_dim % 32 == 0 && head_dim <= 256 && block_size % 16 == 0 &&
                  residual_tokens % block_size == 0 && vgroups > 0 && head_dim % vgroups == 0 &&
                  (head_dim / vgroups) % 16 == 0,
              "the KIVI kernel needs head_dim a multiple of 32 up to 256, block_size a multiple of 16, and value "
              "groups of a multiple of 16 channels");
  TORCH_CHECK(k_codes.scalar_type() == at::kByte && v_codes.scalar_type() == at::kByte &&
                  k_codes.sizes() == at::IntArrayRef({num_blocks, num_kv_heads, head_dim, block_size * bits / 8}) &&
                  v_codes.sizes() == at::IntArrayRef({num_blocks, num_kv_heads, block_size, head_dim * bits / 8}),
              "KIVI codes must be uint8 [blocks, heads, head_dim, block_size * bits / 8] (keys) and [blocks, heads, "
              "block_size, head_dim * bits / 8] (values)");
  for (const auto* t : {&k_scales, &k_zeros})
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->sizes() == at::IntArrayRef({num_blocks, num_kv_heads, head_dim}),
                "KIVI key scales and zero points must be fp16 [blocks, heads, head_dim]");
  for (const auto* t : {&v_scales, &v_zeros})
    TORCH_CHECK(t->scalar_type() == at::kHalf &&
                    t->sizes() == at::IntArrayRef({num_blocks, num_kv_heads, block_size, vgroups}),
                "KIVI value scales and zero points must be fp16 [blocks, heads, block_size, groups]");
  TORCH_CHECK(residual_k.scalar_type() == q.scalar_type() && residual_v.sizes() == residual_k.sizes() &&
                  residual_v.scalar_type() == q.scalar_type() && residual_k.size(1) == num_kv_heads &&
                  residual_k.size(2) == block_size && residual_k.size(3) == head_dim,
              "the residual must be [slots * residual_tokens / block_size, heads, block_size, head_dim] in q's dtype");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && context_lens.scalar_type() == torch::kInt32 &&
                  slots.scalar_type() == torch::kInt32 && slots.size(0) == num_seqs,
              "block_tables, context_lens and slots must be int32");
  for (const auto* t : {&k_codes, &v_codes, &k_scales, &k_zeros, &v_scales, &v_zeros, &residual_k, &residual_v})
    TORCH_CHECK(t->is_contiguous(), "the cache tensors must be contiguous");
  block_tables = block_tables.contiguous();
  context_lens = context_lens.contiguous();
  slots = slots.contiguous();
  const int64_t num_slots = residual_k.size(0) / (residual_tokens / block_size);
  for (int64_t i = 0; i < num_seqs; ++i)
    TORCH_CHECK(slots.data_ptr<int32_t>()[i] >= 0 && slots.data_ptr<int32_t>()[i] < num_slots, "residual slot ",
                slots.data_ptr<int32_t>()[i], " out of range");
  auto out = torch::empty(q.sizes(), q.options());
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  const auto run = [&](auto* q_ptr, auto* res_k, auto* res_v, auto* out_ptr) {
    const auto kernel = [&](auto fn) {
      fn(q_ptr, k_codes.data_ptr<uint8_t>(), v_codes.data_ptr<uint8_t>(), k_scales.data_ptr<at::Half>(),
         k_zeros.data_ptr<at::Half>(), v_scales.data_ptr<at::Half>(), v_zeros.data_ptr<at::Half>(), res_k, res_v,
         block_tables.data_ptr<int32_t>(), context_lens.data_ptr<int32_t>(), slots.data_ptr<int32_t>(), out_ptr,
         num_seqs, num_heads, num_kv_heads, head_dim, block_size, block_tables.size(1), residual_tokens,
         head_dim / vgroups, (float)scale, window, q.stride(0));
    };
    using T = std::remove_pointer_t<decltype(q_ptr)>;
    if (bits == 4) kernel(decode_attention_kivi_avx512<4, T>);
    else kernel(decode_attention_kivi_avx512<2, T>);
  };
  if (q.scalar_type() == at::kBFloat16) {
    run(q.data_ptr<c10::BFloat16>(), residual_k.data_ptr<c10::BFloat16>(), residual_v.data_ptr<c10::BFloat16>(),
        out.data_ptr<c10::BFloat16>());
    return out;
  }
  if (q.scalar_type() == at::kFloat) {
    run(q.data_ptr<float>(), residual_k.data_ptr<float>(), residual_v.data_ptr<float>(), out.data_ptr<float>());
    return out;
  }
#endif
  TORCH_CHECK(false, "the KIVI decode kernel needs AVX-512 (with BF16) and fp32 or bf16 queries");
}

bool has_kivi_attention() {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}


PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "decode attention over a paged KV cache", py::arg("q"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"),
        py::arg("window"), py::arg("k_scales") = py::none(), py::arg("v_scales") = py::none());
  m.def("decode_attention_kivi", &decode_attention_kivi, "decode attention over a KIVI int4/int2 paged cache");
  m.def("has_kivi_attention", &has_kivi_attention, "whether decode_attention_kivi is built for this CPU");
  m.def("rms_norm", &rms_norm, "RMSNorm");
  m.def("add_rms_norm", &add_rms_norm, "residual += x, then RMSNorm of the residual");
  m.def("rotary_", &rotary_, "rotate-half rotary embedding, in place");
  m.def("act_and_mul", &act_and_mul, "act(gate) * up");
  m.def("kv_write", &kv_write, "store this step's keys and values in one layer of the paged cache", py::arg("keys"),
        py::arg("values"), py::arg("k"), py::arg("v"), py::arg("blocks"), py::arg("offsets"),
        py::arg("key_scales") = py::none(), py::arg("value_scales") = py::none());
  m.def("kv_gather_int8", &kv_gather_int8, "one sequence's keys and values from an int8 cache layer, dequantized",
        py::arg("keys"), py::arg("values"), py::arg("key_scales"), py::arg("value_scales"), py::arg("block_ids"),
        py::arg("length"), py::arg("dtype"));
  m.def("kivi_seal", &kivi_seal, "quantize whole blocks of keys and values into a KIVI cache layer");
  m.def("kivi_write", &kivi_write, "a step's writes into a KIVI cache layer: sealed groups and the residual");
  m.def("linear_small_batch", &linear_small_batch, "bf16 x W^T (+ b) for 1..8 rows", py::arg("x"), py::arg("w"),
        py::arg("bias") = py::none());
  m.def("has_linear_small_batch", &has_linear_small_batch);
  m.def("quant_matmul", &quant_matmul, "x W^T (+ b) over block-quantized W, with int8 activations", py::arg("x"),
        py::arg("qs"), py::arg("qh"), py::arg("scale"), py::arg("min"), py::arg("bits"), py::arg("group"),
        py::arg("offset"), py::arg("bias") = py::none());
  m.def("quant_dequantize", &quant_dequantize, "a block-quantized weight in float32 or bfloat16", py::arg("qs"),
        py::arg("qh"), py::arg("scale"), py::arg("min"), py::arg("bits"), py::arg("group"), py::arg("offset"),
        py::arg("K"), py::arg("dtype"));
  m.def("has_quant_matmul", &has_quant_matmul);
  m.def("has_amx_matmul", &has_amx_matmul, "whether bf16 products over packed weights run on AMX tiles");
  m.def("shm_all_reduce", &shm_all_reduce, "sum a tensor over tensor-parallel ranks through shared memory, in place",
        py::call_guard<py::gil_scoped_release>());
  m.def("shm_header_bytes", &shm_header_bytes, "bytes of a shared all-reduce region before its slots");
  register_decoder_stack(m);
}
