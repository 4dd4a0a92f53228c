// Decode attention over a paged KV cache, for CPUs.
//
// One query token per sequence attends to its sequence's keys, read in place from the
// block-table-addressed cache (no gather copy). Work is split over (sequence, kv head) pairs so
// each K/V row is read once and shared by the query heads of its group (GQA). Scores and the
// output accumulate in fp32 whatever the cache dtype.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cpu_check.h"
#include "ops.h"

#include <algorithm>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <cmath>
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

// The bf16 fast path (head_dim a multiple of 32, up to 256). Scores: VDPBF16PS dot products of
// up to 16 keys of a block at once, reduced together; softmax with a vectorised exp; values
// accumulate in fp32. Keys of one head are contiguous within a block (head-major layout).
void decode_attention_bf16_avx512(const c10::BFloat16* q, const c10::BFloat16* k_cache,
                                  const c10::BFloat16* v_cache, const int32_t* block_tables,
                                  const int32_t* context_lens, c10::BFloat16* out, int64_t num_seqs,
                                  int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                                  int64_t max_blocks, float scale, int64_t window, int64_t q_row) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t nq = head_dim / 32, nv = head_dim / 16;
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<__m512bh> qv(group * nq);
    std::vector<__m512> acc(group * nv);
    std::vector<float> scores;  // [group][n padded to 16]
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / num_kv_heads, h = task % num_kv_heads;
      const int64_t len = context_lens[s];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first, stride = (n + 15) / 16 * 16;
      c10::BFloat16* o = out + (s * num_heads + h * group) * head_dim;
      if (n <= 0) {
        std::fill(o, o + group * head_dim, c10::BFloat16(0.f));
        continue;
      }
      const c10::BFloat16* qs = q + s * q_row + h * group * head_dim;
      for (int64_t i = 0; i < group * nq; ++i) qv[i] = load_bh(qs + i * 32);
      scores.assign(group * stride, -INFINITY);
      const int32_t* table = block_tables + s * max_blocks;
      const __m512 vscale = _mm512_set1_ps(scale);
      // Pass 1: scores, a block (or part of one) at a time, at most 16 keys per reduction.
      for (int64_t t = first; t < len;) {
        const int64_t off = t % block_size;
        const int64_t cnt = std::min<int64_t>({16, block_size - off, len - t});
        const c10::BFloat16* kb =
            k_cache + (((int64_t)table[t / block_size] * num_kv_heads + h) * block_size + off) * head_dim;
        const __mmask16 valid = (__mmask16)((1u << cnt) - 1);
        // The loads are what bounds this kernel: prefetch the next keys, and this chunk's values
        // into L2 for pass 2, while the dot products of this chunk run.
        const int64_t next = t + cnt;
        if (next < len) {
          const char* nk = reinterpret_cast<const char*>(
              k_cache + (((int64_t)table[next / block_size] * num_kv_heads + h) * block_size + next % block_size) * head_dim);
          const int64_t ncnt = std::min<int64_t>({16, block_size - next % block_size, len - next});
          for (int64_t b = 0; b < ncnt * head_dim * 2; b += 64) _mm_prefetch(nk + b, _MM_HINT_T0);
        }
        const char* vb = reinterpret_cast<const char*>(v_cache + (kb - k_cache));
        for (int64_t b = 0; b < cnt * head_dim * 2; b += 64) _mm_prefetch(vb + b, _MM_HINT_T1);
        for (int64_t g = 0; g < group; ++g) {
          __m512 dots[16];
          for (int64_t j = 0; j < 16; ++j) {
            __m512 d = _mm512_setzero_ps();
            if (j < cnt)
              for (int64_t c = 0; c < nq; ++c) d = _mm512_dpbf16_ps(d, load_bh(kb + j * head_dim + c * 32), qv[g * nq + c]);
            dots[j] = d;
          }
          float* dst = scores.data() + g * stride + (t - first);
          _mm512_mask_storeu_ps(dst, valid, _mm512_mul_ps(reduce16(dots), vscale));
        }
        t += cnt;
      }
      // Softmax per head (the -inf padding contributes exp(-inf) = 0).
      std::vector<float> inv(group);
      for (int64_t g = 0; g < group; ++g) {
        float* sc = scores.data() + g * stride;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int64_t i = 0; i < stride; i += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sc + i));
        const __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t i = 0; i < stride; i += 16) {
          const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(sc + i), vmax));
          _mm512_storeu_ps(sc + i, e);
          sum = _mm512_add_ps(sum, e);
        }
        inv[g] = 1.f / _mm512_reduce_add_ps(sum);
      }
      // Pass 2: weighted sum of values in fp32.
      for (auto& a : acc) a = _mm512_setzero_ps();
      for (int64_t t = first; t < len; ++t) {
        const c10::BFloat16* vr =
            v_cache + (((int64_t)table[t / block_size] * num_kv_heads + h) * block_size + t % block_size) * head_dim;
        __m512 vv[16];
        for (int64_t j = 0; j < nv; ++j) vv[j] = load_bf16(vr + j * 16);
        for (int64_t g = 0; g < group; ++g) {
          const __m512 p = _mm512_set1_ps(scores[g * stride + (t - first)]);
          for (int64_t j = 0; j < nv; ++j) acc[g * nv + j] = _mm512_fmadd_ps(p, vv[j], acc[g * nv + j]);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        const __m512 vinv = _mm512_set1_ps(inv[g]);
        for (int64_t j = 0; j < nv; ++j) {
          // fp32 -> bf16 with round-to-nearest-even.
          const __m256bh packed = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[g * nv + j], vinv));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + g * head_dim + j * 16), (__m256i)packed);
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

template <typename T>
void decode_attention_kernel(const T* q, const T* k_cache, const T* v_cache, const int32_t* block_tables,
                             const int32_t* context_lens, T* out, int64_t num_seqs, int64_t num_heads,
                             int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
                             float scale, int64_t window, int64_t q_row) {
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
        const T* kr = k_cache + (((int64_t)table[t / block_size] * num_kv_heads + h) * block_size + t % block_size) * head_dim;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) kf[d] = float(kr[d]);
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
        const T* vr = v_cache + (((int64_t)table[t / block_size] * num_kv_heads + h) * block_size + t % block_size) * head_dim;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) kf[d] = float(vr[d]);
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
// including the current token). window > 0 limits attention to the last `window` keys.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                               int64_t window) {
  LOOM_CHECK_CPU(q);
  LOOM_CHECK_CPU(k_cache);
  LOOM_CHECK_CPU(v_cache);
  LOOM_CHECK_CPU(block_tables);
  LOOM_CHECK_CPU(context_lens);
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "q and the caches must share a dtype");
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
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  if (q.scalar_type() == at::kBFloat16 && head_dim % 32 == 0 && head_dim <= 256) {
    decode_attention_bf16_avx512(q.data_ptr<c10::BFloat16>(), k_cache.data_ptr<c10::BFloat16>(),
                                 v_cache.data_ptr<c10::BFloat16>(), block_tables.data_ptr<int32_t>(),
                                 context_lens.data_ptr<int32_t>(), out.data_ptr<c10::BFloat16>(), num_seqs, num_heads,
                                 num_kv_heads, head_dim, block_size, block_tables.size(1), (float)scale, window, q_row);
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    decode_attention_kernel<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
                                      v_cache.data_ptr<scalar_t>(), block_tables.data_ptr<int32_t>(),
                                      context_lens.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), num_seqs,
                                      num_heads, num_kv_heads, head_dim, block_size, block_tables.size(1),
                                      (float)scale, window, q_row);
  });
  return out;
}


PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "decode attention over a paged KV cache");
  m.def("rms_norm", &rms_norm, "RMSNorm");
  m.def("add_rms_norm", &add_rms_norm, "residual += x, then RMSNorm of the residual");
  m.def("rotary_", &rotary_, "rotate-half rotary embedding, in place");
  m.def("act_and_mul", &act_and_mul, "act(gate) * up");
  m.def("kv_write", &kv_write, "store this step's keys and values in one layer of the paged cache");
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
  register_decoder_stack(m);
}
