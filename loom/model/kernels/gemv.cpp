// bf16 matrix times a few vectors (decode at small batch), bandwidth-bound by the weight read.
// oneDNN's bf16 GEMM reaches ~12 GB/s here at M=1, less than half of what two cores can stream;
// this kernel streams each weight row once with VDPBF16PS for all M inputs.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cpu_check.h"
#include "static_count.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include "avx512_bf16.h"

namespace {

constexpr int64_t kMaxM = 8;

using loom_simd::load_bh;
using loom_simd::reduce16;

template <int M>
void gemv_rows(const c10::BFloat16* x, const c10::BFloat16* w, const c10::BFloat16* bias, c10::BFloat16* out,
               int64_t n_begin, int64_t n_end, int64_t K, int64_t N) {
  for (int64_t n0 = n_begin; n0 < n_end; n0 += 16) {
    const int64_t rows = std::min<int64_t>(16, n_end - n0);
    __m512 acc[M][16];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < 16; ++r) acc[m][r] = _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; ++r) {
      const c10::BFloat16* wr = w + (n0 + r) * K;
      for (int64_t k = 0; k < K; k += 32) {
        const __m512bh wv = load_bh(wr + k);
        for (int m = 0; m < M; ++m) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv, load_bh(x + m * K + k));
      }
    }
    const __mmask16 valid = (__mmask16)((1u << rows) - 1);
    __m512 b = _mm512_setzero_ps();
    if (bias) {
      __m256i raw = _mm256_maskz_loadu_epi16(valid, bias + n0);
      b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
    for (int m = 0; m < M; ++m) {
      const __m256bh packed = _mm512_cvtneps_pbh(_mm512_add_ps(reduce16(acc[m]), b));
      _mm256_mask_storeu_epi16(out + m * N + n0, valid, (__m256i)packed);
    }
  }
}

template <int M>
void gemv(const c10::BFloat16* x, const c10::BFloat16* w, const c10::BFloat16* bias, c10::BFloat16* out, int64_t K,
          int64_t N) {
  // Chunks of 16 rows, many per task so each thread streams a long contiguous range.
  at::parallel_for(0, (N + 15) / 16, 64, [&](int64_t b, int64_t e) {
    gemv_rows<M>(x, w, bias, out, b * 16, std::min(e * 16, N), K, N);
  });
}

}  // namespace

// x: [M, K] bf16 (M <= 8), w: [N, K] bf16, K a multiple of 32; bias: [N] or empty. Returns [M, N].
torch::Tensor linear_small_batch(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  LOOM_CHECK_CPU(x);
  LOOM_CHECK_CPU(w);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16 only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && x.size(1) % 32 == 0, "bad shapes");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxM, "M must be 1..8");
  x = x.contiguous();
  TORCH_CHECK(w.is_contiguous(), "weight must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const c10::BFloat16* bp = nullptr;
  if (bias && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->numel() == N && bias->is_contiguous(), "bad bias");
    bp = bias->data_ptr<c10::BFloat16>();
  }
  auto out = torch::empty({M, N}, x.options());
  auto xp = x.data_ptr<c10::BFloat16>();
  auto wp = w.data_ptr<c10::BFloat16>();
  auto op = out.data_ptr<c10::BFloat16>();
  with_count<8>(M, [&](auto m) { gemv<decltype(m)::value>(xp, wp, bp, op, K, N); });
  return out;
}

bool has_linear_small_batch() { return true; }
#else
torch::Tensor linear_small_batch(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(false, "built without AVX512-BF16");
  return x;
}
bool has_linear_small_batch() { return false; }
#endif
