// Fused elementwise kernels for the CPU: each replaces 3-10 PyTorch ops (and their dispatch and
// memory round trips) in every layer. Rounding follows the PyTorch reference ops step by step
// (fp32 compute, a cast back to the tensor dtype wherever the reference casts), so bf16 results
// match the unfused path.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cpu_check.h"
#include "int8_kv.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include "avx512_bf16.h"
#define LOOM_AVX512_BF16 1
#endif

namespace {

// Rows per parallel chunk: small batches (decode at batch 1) stay on one thread.
int64_t grain(int64_t row_elems) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_elems, 1)); }

template <typename T>
inline float round_to(float x) {
  return float(T(x));
}

#ifdef LOOM_AVX512_BF16
// v rounded to bf16 and back, as T(v) then float() does.
inline __m512 round_bf16(__m512 v) { return loom_simd::load_bf16_from(_mm512_cvtneps_pbh(v)); }

// rms_norm_row for bf16 rows of a multiple of 16 values, 16 lanes at a time: the sum of squares in
// 16 partial sums, the rest with the same roundings as the scalar loop.
void rms_norm_row_bf16(const c10::BFloat16* x, const c10::BFloat16* w, c10::BFloat16* out, int64_t n, float eps,
                       float offset) {
  using loom_simd::load_bf16;
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = load_bf16(x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(acc) / float(n) + eps));
  if (offset != 0.f) {
    const __m512 off = _mm512_set1_ps(offset);
    for (int64_t i = 0; i < n; i += 16)
      loom_simd::store_bf16(out + i, _mm512_mul_ps(_mm512_mul_ps(load_bf16(x + i), inv), _mm512_add_ps(off, load_bf16(w + i))));
  } else {
    for (int64_t i = 0; i < n; i += 16)
      loom_simd::store_bf16(out + i, _mm512_mul_ps(load_bf16(w + i), round_bf16(_mm512_mul_ps(load_bf16(x + i), inv))));
  }
}
#endif

// out = norm(x) * w; llama: w * T(x * inv) (the cast before the weight, as HF does);
// gemma (offset 1): T(x * inv * (1 + w)).
template <typename T>
void rms_norm_row(const T* x, const T* w, T* out, int64_t n, float eps, float offset) {
#ifdef LOOM_AVX512_BF16
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (n % 16 == 0) return rms_norm_row_bf16(x, w, out, n, eps, offset);
  }
#endif
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float v = float(x[i]);
    ss += v * v;
  }
  const float inv = 1.f / std::sqrt(ss / float(n) + eps);
  if (offset != 0.f) {
    for (int64_t i = 0; i < n; ++i) out[i] = T(float(x[i]) * inv * (offset + float(w[i])));
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = T(float(w[i]) * round_to<T>(float(x[i]) * inv));
  }
}

// res += x, each sum rounded to T (as `residual + x`).
template <typename T>
void add_into(T* res, const T* x, int64_t n) {
  int64_t i = 0;
#ifdef LOOM_AVX512_BF16
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    for (; i + 16 <= n; i += 16)
      loom_simd::store_bf16(res + i, _mm512_add_ps(loom_simd::load_bf16(res + i), loom_simd::load_bf16(x + i)));
#endif
  for (; i < n; ++i) res[i] = T(float(res[i]) + float(x[i]));
}

// One head of rotary_ (below), in place.
template <typename T>
void rotate_head(T* r, const T* c, const T* s, int64_t half) {
  int64_t i = 0;
#ifdef LOOM_AVX512_BF16
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    using loom_simd::load_bf16;
    for (; i + 16 <= half; i += 16) {
      const __m512 x1 = load_bf16(r + i), x2 = load_bf16(r + i + half), ci = load_bf16(c + i), si = load_bf16(s + i);
      loom_simd::store_bf16(r + i, _mm512_sub_ps(round_bf16(_mm512_mul_ps(x1, ci)), round_bf16(_mm512_mul_ps(x2, si))));
      loom_simd::store_bf16(r + i + half, _mm512_add_ps(round_bf16(_mm512_mul_ps(x2, ci)), round_bf16(_mm512_mul_ps(x1, si))));
    }
  }
#endif
  for (; i < half; ++i) {
    const float x1 = float(r[i]), x2 = float(r[i + half]), ci = float(c[i]), si = float(s[i]);
    r[i] = T(round_to<T>(x1 * ci) - round_to<T>(x2 * si));
    r[i + half] = T(round_to<T>(x2 * ci) + round_to<T>(x1 * si));
  }
}

}  // namespace

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps, double offset) {
  LOOM_CHECK_CPU(x);
  LOOM_CHECK_CPU(w);
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && w.is_contiguous() && w.size(0) == x.size(1), "bad shapes");
  auto out = torch::empty({x.size(0), x.size(1)}, x.options());
  const int64_t n = x.size(1), xs = x.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, x.size(0), grain(n), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) rms_norm_row(xp + r * xs, wp, op + r * n, n, (float)eps, (float)offset);
    });
  });
  return out;
}

// residual += x (rounded to the dtype, like `residual + x`), then return norm(residual).
torch::Tensor add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor w, double eps, double offset) {
  LOOM_CHECK_CPU(x);
  LOOM_CHECK_CPU(residual);
  LOOM_CHECK_CPU(w);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && residual.is_contiguous() && x.sizes() == residual.sizes(),
              "bad shapes");
  auto out = torch::empty_like(x);
  const int64_t n = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* rp = residual.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, x.size(0), grain(n), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        scalar_t* res = rp + r * n;
        add_into(res, xp + r * n, n);
        rms_norm_row(res, wp, op + r * n, n, (float)eps, (float)offset);
      }
    });
  });
  return out;
}

// In place on x [T, heads, D] (rows may be strided, e.g. the q|k part of a fused qkv output):
// x1, x2 = halves; x1' = x1*cos - x2*sin; x2' = x2*cos + x1*sin, each product rounded to the
// dtype as the reference does. cos/sin: [T, D/2] in the dtype.
void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  LOOM_CHECK_CPU(x);
  LOOM_CHECK_CPU(cos);
  LOOM_CHECK_CPU(sin);
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "x must be [T, heads, D] with contiguous heads");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(1) * 2 == x.size(2), "bad cos/sin");
  const int64_t heads = x.size(1), half = x.size(2) / 2, xs = x.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary_", [&] {
    using T = scalar_t;
    T* xp = x.data_ptr<T>();
    const T* cp = cos.data_ptr<T>();
    const T* sp = sin.data_ptr<T>();
    at::parallel_for(0, x.size(0), grain(heads * half * 2), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const T* c = cp + t * half;
        const T* s = sp + t * half;
        for (int64_t h = 0; h < heads; ++h) {
          rotate_head(xp + t * xs + h * 2 * half, c, s, half);
        }
      }
    });
  });
}

// [T, 2I] -> [T, I]: act(gate) * up with act = silu (0) or tanh-approximated gelu (1).
torch::Tensor act_and_mul(torch::Tensor gate_up, int64_t act) {
  LOOM_CHECK_CPU(gate_up);
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0, "bad shapes");
  const int64_t inter = gate_up.size(1) / 2;
  auto out = torch::empty({gate_up.size(0), inter}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "act_and_mul", [&] {
    using T = scalar_t;
    const T* gp = gate_up.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, gate_up.size(0), grain(inter * 2), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const T* g = gp + r * 2 * inter;
        const T* u = g + inter;
        T* o = op + r * inter;
        int64_t start = 0;
#ifdef LOOM_AVX512_BF16
        if (std::is_same_v<T, c10::BFloat16> && act == 0) {
          // silu, 16 lanes at a time, with the same two roundings as the scalar loop. (The casts
          // only ever run for bf16; the dispatch lambda is not a template, so no if constexpr.)
          const auto* gb = reinterpret_cast<const c10::BFloat16*>(g);
          const auto* ub = reinterpret_cast<const c10::BFloat16*>(u);
          auto* ob = reinterpret_cast<c10::BFloat16*>(o);
          for (; start + 16 <= inter; start += 16) {
            const __m512 x = loom_simd::load_bf16(gb + start);
            const __m512 e = loom_simd::exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x));
            const __m512 s = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e));
            const __m512 s_rounded = loom_simd::load_bf16_from(_mm512_cvtneps_pbh(s));
            loom_simd::store_bf16(ob + start, _mm512_mul_ps(s_rounded, loom_simd::load_bf16(ub + start)));
          }
        }
#endif
        if (act == 0) {
          for (int64_t i = start; i < inter; ++i) {
            const float x = float(g[i]);
            o[i] = T(round_to<T>(x / (1.f + std::exp(-x))) * float(u[i]));
          }
        } else {
          for (int64_t i = 0; i < inter; ++i) {
            const float x = float(g[i]);
            const float y = 0.5f * x * (1.f + std::tanh(0.7978845608028654f * (x + 0.044715f * x * x * x)));
            o[i] = T(round_to<T>(y) * float(u[i]));
          }
        }
      }
    });
  });
  return out;
}

// keys/values: one layer of the cache [num_blocks, num_kv_heads, block_size, head_dim]; k/v: this
// step's [T, num_kv_heads, head_dim]; slot t goes to (blocks[t], :, offsets[t]). One call for both
// (PyTorch's indexed assignment costs ~20 us per tensor per layer at decode sizes).
namespace {

// Symmetric int8 codes of one row of D values, in groups of `group` values each with its fp16 scale
// (max |x| / 127) at scale[i * scale_stride], rounded half to even against the stored scale: the
// same codes as loom.model.kv_cache.quantize_int8. Code d goes to codes[(d / 2) * pair_stride + d %
// 2]: pair_stride 2 stores the row as it is, 2 * block_size stores a key pair-major within its block
// (what the decode kernel reads).
template <typename T>
void quantize_row_int8(const T* x, int64_t D, int64_t group, int8_t* codes, int64_t pair_stride, at::Half* scale,
                       int64_t scale_stride) {
#ifdef LOOM_AVX512_BF16
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    if (group % 16 == 0) {  // 16 values at a time; the same division and rounding (MXCSR: half to even)
      using loom_simd::load16;
      for (int64_t g0 = 0; g0 < D; g0 += group) {
        __m512 amax = _mm512_setzero_ps();
        for (int64_t d = g0; d < g0 + group; d += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(x + d)));
        const at::Half s = at::Half(_mm512_reduce_max_ps(amax) / 127.f);
        scale[g0 / group * scale_stride] = s;
        const float sf = float(s);
        const __m512 vs = _mm512_set1_ps(sf);
        for (int64_t d = g0; d < g0 + group; d += 16) {
          __m512i c = sf > 0.f ? _mm512_cvtps_epi32(_mm512_div_ps(load16(x + d), vs)) : _mm512_setzero_si512();
          c = _mm512_max_epi32(_mm512_min_epi32(c, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
          const __m128i bytes = _mm512_cvtepi32_epi8(c);
          if (pair_stride == 2) {
            _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + d), bytes);
          } else {
            alignas(16) int16_t pairs[8];
            _mm_store_si128(reinterpret_cast<__m128i*>(pairs), bytes);
            for (int64_t p = 0; p < 8; ++p) std::memcpy(codes + (d / 2 + p) * pair_stride, pairs + p, 2);
          }
        }
      }
      return;
    }
  }
#endif
  for (int64_t g0 = 0; g0 < D; g0 += group) {
    float amax = 0.f;
    for (int64_t d = g0; d < g0 + group; ++d) amax = std::max(amax, std::fabs(float(x[d])));
    const at::Half s = at::Half(amax / 127.f);
    scale[g0 / group * scale_stride] = s;
    const float sf = float(s);
    for (int64_t d = g0; d < g0 + group; ++d) {
      const float c = sf > 0.f ? std::nearbyint(float(x[d]) / sf) : 0.f;
      codes[(d >> 1) * pair_stride + (d & 1)] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, c)));
    }
  }
}

}  // namespace

// keys/values: one cache layer [blocks, heads, block_size, head_dim]; k, v: [T, heads, head_dim];
// blocks/offsets: int64 [T]. An int8 cache takes fp16 key_scales [blocks, heads, head_dim / 16,
// block_size] and value_scales [blocks, heads, block_size] and stores codes and scales, the keys
// pair-major within each block (see quantize_row_int8); any other cache stores k and v as they are.
void kv_write(torch::Tensor keys, torch::Tensor values, torch::Tensor k, torch::Tensor v, torch::Tensor blocks,
              torch::Tensor offsets, c10::optional<torch::Tensor> key_scales,
              c10::optional<torch::Tensor> value_scales) {
  LOOM_CHECK_CPU(keys);
  LOOM_CHECK_CPU(k);
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && keys.sizes() == values.sizes() && keys.dim() == 4,
              "cache layers must be contiguous [blocks, heads, block_size, head_dim]");
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.size(1) == keys.size(1) && k.size(2) == keys.size(3),
              "k and v must be [T, num_kv_heads, head_dim]");
  const bool int8 = keys.scalar_type() == at::kChar;
  TORCH_CHECK(int8 == key_scales.has_value() && int8 == value_scales.has_value(),
              "an int8 cache needs key and value scales, any other none");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && (int8 || k.scalar_type() == keys.scalar_type()),
              "dtype mismatch");
  if (int8) check_int8_kv_scales(keys, *key_scales, *value_scales);
  TORCH_CHECK(blocks.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong && blocks.numel() == k.size(0) &&
              offsets.numel() == k.size(0), "blocks and offsets must be int64 [T]");
  // k and v may be views into the step's fused q/k/v rows: only each row's heads must be packed.
  if (k.stride(2) != 1 || k.stride(1) != k.size(2)) k = k.contiguous();
  if (v.stride(2) != 1 || v.stride(1) != v.size(2)) v = v.contiguous();
  blocks = blocks.contiguous();
  offsets = offsets.contiguous();
  const int64_t T = k.size(0), H = k.size(1), D = k.size(2), NB = keys.size(0), BS = keys.size(2);
  const auto* bp = blocks.data_ptr<int64_t>();
  const auto* op = offsets.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(bp[t] >= 0 && bp[t] < NB && op[t] >= 0 && op[t] < BS, "slot out of range");
  if (int8) {
    auto* kc = keys.data_ptr<int8_t>();
    auto* vc = values.data_ptr<int8_t>();
    auto* ks = key_scales->data_ptr<at::Half>();
    auto* vs = value_scales->data_ptr<at::Half>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "kv_write_int8", [&] {
      const auto* kp = k.data_ptr<scalar_t>();
      const auto* vp = v.data_ptr<scalar_t>();
      at::parallel_for(0, T, grain(2 * H * D), [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t)
          for (int64_t h = 0; h < H; ++h) {
            const int64_t slab = (bp[t] * H + h) * BS, slot = slab + op[t];
            quantize_row_int8(kp + t * k.stride(0) + h * D, D, kInt8KeyGroup, kc + slab * D + op[t] * 2, 2 * BS,
                              ks + slab * (D / kInt8KeyGroup) + op[t], BS);
            quantize_row_int8(vp + t * v.stride(0) + h * D, D, D, vc + slot * D, 2, vs + slot, 1);
          }
      });
    });
    return;
  }
  const int64_t row = D * k.element_size();
  auto* kc = static_cast<char*>(keys.data_ptr());
  auto* vc = static_cast<char*>(values.data_ptr());
  const auto* ks = static_cast<const char*>(k.data_ptr());
  const auto* vs = static_cast<const char*>(v.data_ptr());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t dst = ((bp[t] * H + h) * BS + op[t]) * row;
      std::memcpy(kc + dst, ks + (t * k.stride(0) + h * D) * k.element_size(), row);
      std::memcpy(vc + dst, vs + (t * v.stride(0) + h * D) * v.element_size(), row);
    }
}

// One sequence's first `length` keys and values from an int8 cache layer, dequantized to `dtype`,
// each [heads, length, head_dim]: the blocks `block_ids` (int64) in order. One pass over the codes,
// where the PyTorch path (Int8KVCache._read) makes several; the results are the same, bit for bit.
std::tuple<torch::Tensor, torch::Tensor> kv_gather_int8(torch::Tensor keys, torch::Tensor values,
                                                        torch::Tensor key_scales, torch::Tensor value_scales,
                                                        torch::Tensor block_ids, int64_t length,
                                                        at::ScalarType dtype) {
  LOOM_CHECK_CPU(keys);
  LOOM_CHECK_CPU(block_ids);
  TORCH_CHECK(keys.scalar_type() == at::kChar && values.scalar_type() == at::kChar && keys.dim() == 4 &&
              keys.is_contiguous() && values.is_contiguous() && keys.sizes() == values.sizes(),
              "an int8 cache layer is contiguous int8 [blocks, heads, block_size, head_dim]");
  check_int8_kv_scales(keys, key_scales, value_scales);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dequantize to float32 or bfloat16");
  block_ids = block_ids.to(at::kLong).contiguous();
  const int64_t NB = keys.size(0), H = keys.size(1), BS = keys.size(2), D = keys.size(3), G = D / kInt8KeyGroup;
  const int64_t n = block_ids.numel();
  TORCH_CHECK(0 <= length && length <= n * BS, "length exceeds the blocks");
  const int64_t* ids = block_ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(ids[i] >= 0 && ids[i] < NB, "block out of range");
  auto k = torch::empty({H, length, D}, keys.options().dtype(dtype));
  auto v = torch::empty({H, length, D}, keys.options().dtype(dtype));
  const int8_t* kc = keys.data_ptr<int8_t>();
  const int8_t* vc = values.data_ptr<int8_t>();
  const at::Half* ks = key_scales.data_ptr<at::Half>();
  const at::Half* vs = value_scales.data_ptr<at::Half>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "kv_gather_int8", [&] {
    scalar_t* ko = k.data_ptr<scalar_t>();
    scalar_t* vo = v.data_ptr<scalar_t>();
    at::parallel_for(0, H * n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t h = task / n, b = task % n, slab = ids[b] * H + h;
        for (int64_t o = 0; o < BS && b * BS + o < length; ++o) {
          const int64_t t = b * BS + o;
          scalar_t* kr = ko + (h * length + t) * D;
          scalar_t* vr = vo + (h * length + t) * D;
          const float vscale = float(vs[slab * BS + o]);
          for (int64_t d = 0; d < D; ++d) {
            const float kscale = float(ks[(slab * G + d / kInt8KeyGroup) * BS + o]);
            kr[d] = scalar_t(float(kc[slab * BS * D + ((d >> 1) * BS + o) * 2 + (d & 1)]) * kscale);
            vr[d] = scalar_t(float(vc[(slab * BS + o) * D + d]) * vscale);
          }
        }
      }
    });
  });
  return {k, v};
}

namespace {

// KIVI's asymmetric codes of n values (stride `step` apart) over their min and max, as
// kv_cache.quantize_asym computes them: the scale and zero point rounded to fp16 first, the codes
// rounded half to even against them, so both paths store the same bytes.
template <typename T>
void kivi_quantize_run(const T* x, int64_t n, int64_t step, int levels, uint8_t* codes, at::Half* scale,
                       at::Half* zero) {
  float lo = INFINITY, hi = -INFINITY;
  for (int64_t i = 0; i < n; ++i) {
    const float f = float(x[i * step]);
    lo = std::min(lo, f);
    hi = std::max(hi, f);
  }
  const at::Half s16((hi - lo) / float(levels)), z16(lo);
  *scale = s16;
  *zero = z16;
  const float s = float(s16), z = float(z16);
  for (int64_t i = 0; i < n; ++i) {
    const float c = s > 0.f ? std::nearbyint((float(x[i * step]) - z) / s) : 0.f;
    codes[i] = (uint8_t)std::min<float>(std::max(c, 0.f), float(levels));
  }
}

// 8 / bits codes per byte, the first in the lowest bits (kv_cache.pack_codes).
void kivi_pack(const uint8_t* codes, int64_t n, int bits, uint8_t* out) {
  const int per = 8 / bits;
  for (int64_t i = 0; i < n / per; ++i) {
    uint8_t b = 0;
    for (int j = 0; j < per; ++j) b |= (uint8_t)(codes[i * per + j] << (j * bits));
    out[i] = b;
  }
}

}  // namespace

// Quantize whole blocks of keys and values ([n * block_size, heads, head_dim] each, rows in block
// order) into KIVI blocks `blocks` of one layer: keys per channel over the block's tokens, values per
// token and group of channels; the same bytes as KiviKVCache's PyTorch path.
void kivi_seal(torch::Tensor keys, torch::Tensor key_scales, torch::Tensor key_zeros, torch::Tensor values,
               torch::Tensor value_scales, torch::Tensor value_zeros, torch::Tensor k, torch::Tensor v,
               torch::Tensor blocks, int64_t bits) {
  for (const auto* t : {&keys, &key_scales, &key_zeros, &values, &value_scales, &value_zeros, &k, &v, &blocks})
    LOOM_CHECK_CPU(*t);
  TORCH_CHECK(bits == 4 || bits == 2, "KIVI codes have 4 or 2 bits, not ", bits);
  const int64_t nb = keys.size(0), h = keys.size(1), d = keys.size(2), bs = values.size(2);
  const int64_t groups = value_scales.size(3), group = d / groups, n = blocks.size(0);
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && key_scales.is_contiguous() && key_zeros.is_contiguous()
                  && value_scales.is_contiguous() && value_zeros.is_contiguous(), "the cache must be contiguous");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && k.sizes() == v.sizes() &&
                  k.sizes() == at::IntArrayRef({n * bs, h, d}) && k.scalar_type() == v.scalar_type(),
              "k and v must be contiguous [blocks * block_size, heads, head_dim]");
  TORCH_CHECK(blocks.scalar_type() == torch::kInt64, "blocks must be int64");
  blocks = blocks.contiguous();
  const int64_t* ids = blocks.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(ids[i] >= 0 && ids[i] < nb, "block ", ids[i], " out of range");
  const int levels = (1 << bits) - 1;
  uint8_t* kc = keys.data_ptr<uint8_t>();
  uint8_t* vc = values.data_ptr<uint8_t>();
  at::Half *ks = key_scales.data_ptr<at::Half>(), *kz = key_zeros.data_ptr<at::Half>();
  at::Half *vs = value_scales.data_ptr<at::Half>(), *vz = value_zeros.data_ptr<at::Half>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "kivi_seal", [&] {
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    at::parallel_for(0, n * h, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> codes(std::max(bs, d));
      for (int64_t task = begin; task < end; ++task) {
        const int64_t i = task / h, hh = task % h, slab = ids[i] * h + hh;
        for (int64_t c = 0; c < d; ++c) {  // a key channel over the block's tokens
          kivi_quantize_run(kp + (i * bs * h + hh) * d + c, bs, h * d, levels, codes.data(), ks + slab * d + c,
                            kz + slab * d + c);
          kivi_pack(codes.data(), bs, (int)bits, kc + (slab * d + c) * (bs * bits / 8));
        }
        for (int64_t t = 0; t < bs; ++t) {  // a value token, group by group
          const scalar_t* row = vp + ((i * bs + t) * h + hh) * d;
          for (int64_t g = 0; g < groups; ++g)
            kivi_quantize_run(row + g * group, group, 1, levels, codes.data() + g * group,
                              vs + (slab * bs + t) * groups + g, vz + (slab * bs + t) * groups + g);
          kivi_pack(codes.data(), d, (int)bits, vc + (slab * bs + t) * (d * bits / 8));
        }
      }
    });
  });
}

// A step's writes into one KIVI cache layer (KiviKVCache.write; kv_cache.ResidualWrites holds the
// index tensors): the groups completed in this step are assembled from the residual and this step's
// rows and sealed into their blocks, then the other rows go to the residual. k, v: [T, heads, head_dim]
// in the residual's dtype.
void kivi_write(torch::Tensor keys, torch::Tensor key_scales, torch::Tensor key_zeros, torch::Tensor values,
                torch::Tensor value_scales, torch::Tensor value_zeros, torch::Tensor residual_k,
                torch::Tensor residual_v, torch::Tensor k, torch::Tensor v, torch::Tensor seal_blocks,
                torch::Tensor seal_rows_from_residual, torch::Tensor residual_blocks, torch::Tensor residual_offsets,
                torch::Tensor seal_rows_from_step, torch::Tensor step_rows, torch::Tensor open_rows,
                torch::Tensor open_blocks, torch::Tensor open_offsets, int64_t bits) {
  using torch::indexing::Slice;
  TORCH_CHECK(k.scalar_type() == residual_k.scalar_type() && v.scalar_type() == residual_v.scalar_type(),
              "k and v must be in the residual's dtype");
  if (seal_blocks.numel()) {
    const int64_t rows = seal_blocks.size(0) * values.size(2);
    auto kb = torch::empty({rows, k.size(1), k.size(2)}, k.options());
    auto vb = torch::empty({rows, v.size(1), v.size(2)}, v.options());
    if (seal_rows_from_residual.numel()) {
      kb.index_put_({seal_rows_from_residual}, residual_k.index({residual_blocks, Slice(), residual_offsets}));
      vb.index_put_({seal_rows_from_residual}, residual_v.index({residual_blocks, Slice(), residual_offsets}));
    }
    kb.index_put_({seal_rows_from_step}, k.index({step_rows}));
    vb.index_put_({seal_rows_from_step}, v.index({step_rows}));
    kivi_seal(keys, key_scales, key_zeros, values, value_scales, value_zeros, kb, vb, seal_blocks, bits);
  }
  if (open_rows.numel()) {
    residual_k.index_put_({open_blocks, Slice(), open_offsets}, k.index({open_rows}));
    residual_v.index_put_({open_blocks, Slice(), open_offsets}, v.index({open_rows}));
  }
}
