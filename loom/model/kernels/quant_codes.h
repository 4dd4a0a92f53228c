// The packed block layout of loom.model.quant (see the top of quant_matmul.cpp), shared by the int8
// dot-product kernels (quant_matmul.cpp) and the AMX tile kernel (amx_matmul.cpp).
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LOOM_QUANT_KERNELS 1
#include <immintrin.h>

namespace loom_quant {

constexpr int64_t kBlock = 32;

// fp16 to fp32 with the F16C instruction (c10::Half's conversion is a software routine).
inline float half(at::Half h) { return _cvtsh_ss(h.x); }

// n fp16 values to fp32, 8 at a time.
inline void halves_to_floats(const at::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = half(src[i]);
}

// 0x10 << shift in each byte whose bit is set in the 32-bit plane at p (byte i <- bit i).
inline __m256i expand_bits(const uint8_t* p, int shift) {
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  const __m256i pick = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int32_t>(bits)), pick);
  bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  const __m256i set = _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
  return _mm256_and_si256(set, _mm256_set1_epi8(static_cast<char>(0x10 << shift)));
}

struct Weights {
  const uint8_t* qs;       // [N, K/2] (bits < 8) or [N, K] int8 (bits == 8)
  const uint8_t* qh;       // [N, K/32 * 4 * (bits - 4)] bit planes, bits 5 and 6 only
  const at::Half* scale;   // [N, K/group]
  const at::Half* min;     // [N, K/group] or null: then min = -offset * scale
  int bits;
  int64_t group;
  float offset;
  int64_t K;
};

// The codes of block b of row n as 32 unsigned bytes; for 8-bit codes, |w| (and the signed codes
// in `sign`, to move their signs onto the activations). Bits is a template argument so that the
// callers' loops unroll and their accumulators stay in registers.
template <int Bits>
inline __m256i load_codes(const uint8_t* qs_row, const uint8_t* qh_row, int64_t b, __m256i& sign) {
  if constexpr (Bits == 8) {
    sign = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs_row + b * kBlock));
    return _mm256_sign_epi8(sign, sign);
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs_row + b * 16));
    __m256i v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
    constexpr int planes = Bits - 4;
    for (int p = 0; p < planes; ++p) v = _mm256_or_si256(v, expand_bits(qh_row + (b * planes + p) * 4, p));
    return v;
  }
}

// Row n's packed codes and bit planes.
inline const uint8_t* qs_row(const Weights& w, int64_t n) { return w.qs + n * (w.bits == 8 ? w.K : w.K / 2); }
inline const uint8_t* qh_row(const Weights& w, int64_t n) {
  return w.qh ? w.qh + n * (w.K / kBlock) * 4 * (w.bits - 4) : nullptr;
}

inline __m256i load_codes(const Weights& w, int64_t n, int64_t b, __m256i& sign) {
  const uint8_t* qs = qs_row(w, n);
  const uint8_t* qh = qh_row(w, n);
  switch (w.bits) {
    case 4: return load_codes<4>(qs, qh, b, sign);
    case 5: return load_codes<5>(qs, qh, b, sign);
    case 6: return load_codes<6>(qs, qh, b, sign);
    default: return load_codes<8>(qs, qh, b, sign);
  }
}

constexpr int64_t kChunkRows = 64;  // weight rows per unit of work handed to a thread

// fn(begin, end) over [0, N) in chunks that the threads take in turn, not split evenly up front: when
// another process takes a core for a moment (the server's event loop, a client on the same machine),
// the other threads carry on with the remaining chunks instead of waiting for the preempted one's share.
template <typename F>
void parallel_chunks(int64_t N, const F& fn) {
  const int64_t chunks = (N + kChunkRows - 1) / kChunkRows;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (threads <= 1) {
    fn(0, N);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;)
      fn(c * kChunkRows, std::min(N, (c + 1) * kChunkRows));
  });
}

// bf16 x W^T (+ bias) through AMX tiles (amx_matmul.cpp), for any number of rows M.
void amx_matmul(const c10::BFloat16* x, const Weights& w, const c10::BFloat16* bias, c10::BFloat16* out, int64_t M,
                int64_t N);
// Whether amx_matmul can run: built with AMX-BF16 and granted the tile state by the OS.
bool amx_ready();

}  // namespace loom_quant
#endif
