// Decode attention over a paged KV cache, for CPUs.
//
// One query token per sequence attends to its sequence's keys, read in place from the
// block-table-addressed cache (no gather copy). Work is split over (sequence, kv head) pairs so
// each K/V row is read once and shared by the query heads of its group (GQA). Scores and the
// output accumulate in fp32 whatever the cache dtype.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
// 16 bf16 values -> 16 fp32 (bf16 is the top half of an fp32).
inline __m512 load_bf16(const c10::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// The bf16 fast path for head_dim a multiple of 16 (up to 256): q rows and the accumulators
// stay in registers/L1, each K and V row is converted once and used by every head of the group.
void decode_attention_bf16_avx512(const c10::BFloat16* q, const c10::BFloat16* k_cache,
                                  const c10::BFloat16* v_cache, const int32_t* block_tables,
                                  const int32_t* context_lens, c10::BFloat16* out, int64_t num_seqs,
                                  int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                                  int64_t max_blocks, float scale, int64_t window) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t nv = head_dim / 16;
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<__m512> qv(group * nv), acc(group * nv);
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / num_kv_heads, h = task % num_kv_heads;
      const int64_t len = context_lens[s];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      c10::BFloat16* o = out + (s * num_heads + h * group) * head_dim;
      if (n <= 0) {
        std::fill(o, o + group * head_dim, c10::BFloat16(0.f));
        continue;
      }
      const c10::BFloat16* qs = q + (s * num_heads + h * group) * head_dim;
      const __m512 vscale = _mm512_set1_ps(scale);
      for (int64_t i = 0; i < group * nv; ++i) qv[i] = _mm512_mul_ps(load_bf16(qs + i * 16), vscale);
      scores.resize(n * group);
      const int32_t* table = block_tables + s * max_blocks;
      std::vector<float> mx(group, -INFINITY), sum(group, 0.f);
      for (int64_t t = first; t < len; ++t) {
        const c10::BFloat16* kr =
            k_cache + (((int64_t)table[t / block_size] * num_kv_heads + h) * block_size + t % block_size) * head_dim;
        __m512 kv[16];
        for (int64_t j = 0; j < nv; ++j) kv[j] = load_bf16(kr + j * 16);
        for (int64_t g = 0; g < group; ++g) {
          __m512 d = _mm512_mul_ps(qv[g * nv], kv[0]);
          for (int64_t j = 1; j < nv; ++j) d = _mm512_fmadd_ps(qv[g * nv + j], kv[j], d);
          const float dot = _mm512_reduce_add_ps(d);
          scores[(t - first) * group + g] = dot;
          mx[g] = std::max(mx[g], dot);
        }
      }
      for (int64_t i = 0; i < n; ++i)
        for (int64_t g = 0; g < group; ++g) {
          const float e = std::exp(scores[i * group + g] - mx[g]);
          scores[i * group + g] = e;
          sum[g] += e;
        }
      for (auto& a : acc) a = _mm512_setzero_ps();
      for (int64_t t = first; t < len; ++t) {
        const c10::BFloat16* vr =
            v_cache + (((int64_t)table[t / block_size] * num_kv_heads + h) * block_size + t % block_size) * head_dim;
        __m512 vv[16];
        for (int64_t j = 0; j < nv; ++j) vv[j] = load_bf16(vr + j * 16);
        for (int64_t g = 0; g < group; ++g) {
          const __m512 p = _mm512_set1_ps(scores[(t - first) * group + g]);
          for (int64_t j = 0; j < nv; ++j) acc[g * nv + j] = _mm512_fmadd_ps(p, vv[j], acc[g * nv + j]);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        const __m512 inv = _mm512_set1_ps(1.f / sum[g]);
        alignas(64) float tmp[16];
        for (int64_t j = 0; j < nv; ++j) {
          _mm512_store_ps(tmp, _mm512_mul_ps(acc[g * nv + j], inv));
          for (int i = 0; i < 16; ++i) o[g * head_dim + j * 16 + i] = c10::BFloat16(tmp[i]);
        }
      }
    }
  });
}
#endif

template <typename T>
void decode_attention_kernel(const T* q, const T* k_cache, const T* v_cache, const int32_t* block_tables,
                             const int32_t* context_lens, T* out, int64_t num_seqs, int64_t num_heads,
                             int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
                             float scale, int64_t window) {
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
      const T* qs = q + (s * num_heads + h * group) * head_dim;
      for (int64_t i = 0; i < group * head_dim; ++i) qf[i] = float(qs[i]) * scale;
      scores.resize(n * group);
      const int32_t* table = block_tables + s * max_blocks;
      for (int64_t t = first; t < len; ++t) {
        const T* kr = k_cache + (((int64_t)table[t / block_size] * num_kv_heads + h) * block_size + t % block_size) * head_dim;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) kf[d] = float(kr[d]);
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qf.data() + g * head_dim;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * kf[d];
          scores[(t - first) * group + g] = dot;
        }
      }
      std::vector<float> mx(group, -INFINITY), sum(group, 0.f);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t g = 0; g < group; ++g) mx[g] = std::max(mx[g], scores[i * group + g]);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t g = 0; g < group; ++g) {
          const float e = std::exp(scores[i * group + g] - mx[g]);
          scores[i * group + g] = e;
          sum[g] += e;
        }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = first; t < len; ++t) {
        const T* vr = v_cache + (((int64_t)table[t / block_size] * num_kv_heads + h) * block_size + t % block_size) * head_dim;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) kf[d] = float(vr[d]);
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[(t - first) * group + g];
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
// including the current token). window > 0 limits attention to the last `window` keys.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                               int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && context_lens.scalar_type() == torch::kInt32,
              "block_tables and context_lens must be int32");
  q = q.contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  block_tables = block_tables.contiguous();
  context_lens = context_lens.contiguous();
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(1), block_size = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim && num_heads % num_kv_heads == 0, "head mismatch");
  auto out = torch::empty_like(q);
#if defined(__AVX512F__)
  if (q.scalar_type() == at::kBFloat16 && head_dim % 16 == 0 && head_dim <= 256) {
    decode_attention_bf16_avx512(q.data_ptr<c10::BFloat16>(), k_cache.data_ptr<c10::BFloat16>(),
                                 v_cache.data_ptr<c10::BFloat16>(), block_tables.data_ptr<int32_t>(),
                                 context_lens.data_ptr<int32_t>(), out.data_ptr<c10::BFloat16>(), num_seqs, num_heads,
                                 num_kv_heads, head_dim, block_size, block_tables.size(1), (float)scale, window);
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    decode_attention_kernel<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
                                      v_cache.data_ptr<scalar_t>(), block_tables.data_ptr<int32_t>(),
                                      context_lens.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), num_seqs,
                                      num_heads, num_kv_heads, head_dim, block_size, block_tables.size(1),
                                      (float)scale, window);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "decode attention over a paged KV cache");
}
