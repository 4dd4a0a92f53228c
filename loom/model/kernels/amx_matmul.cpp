// bf16 x W^T over a block-quantized W with AMX tiles, for CPUs with AMX-BF16 (Sapphire Rapids and later).
//
// With AMX a bf16 tile product is so cheap that what a batched step costs is reading and unpacking
// the weight. So each weight is unpacked once per call: 16 rows at a time into a bf16 panel that
// stays in the core's cache, which then meets every activation row. The weight is the tile product's
// A operand (16 rows x 32 elements, one quantization block: the panel holds exactly that, with no
// transpose) and the activations, repacked once per call into pairs, are the B operand, so a tile
// of C holds 16 outputs x 16 activation rows. Values match dequantize + a bf16 GEMM (fp32 sums).
#include "quant_codes.h"
#include "static_count.h"

#if defined(LOOM_QUANT_KERNELS) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <string>
#include <vector>

namespace loom_quant {
namespace {

constexpr int kTile = 16;            // rows of a tile; each row is 64 bytes (32 bf16, one block)
constexpr int kMaxCTiles = 4;        // tiles 2..5 accumulate 4 x 16 activation rows per pass
constexpr int64_t kTileWords = 256;  // 32-bit words per tile (16 rows x 64 bytes)
constexpr int64_t kHigh4 = 0x0004000400040004;  // a shift of 4 in each 16-bit lane

// Tiles: 0 = weight panel block (A), 1 and 7 = activation pairs (B, alternating), 2..5 = outputs (C).
void load_tile_config() {
  struct alignas(64) Config {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
  } cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = kTile;
  }
  _tile_loadconfig(&cfg);
}

// Row n's scales and mins as floats, one per slice (a block, or half a block for 16-element groups).
void row_scales(const Weights& w, int64_t n, float* scales, float* mins) {
  const int64_t groups = w.K / w.group, per_group = w.group == 16 ? 1 : w.group / kBlock;
  const at::Half* sc = w.scale + n * groups;
  const at::Half* mn = w.min ? w.min + n * groups : nullptr;
  if (per_group == 1) {
    halves_to_floats(sc, scales, groups);
    if (mn) halves_to_floats(mn, mins, groups);
    else
      for (int64_t g = 0; g < groups; ++g) mins[g] = -w.offset * scales[g];
    return;
  }
  for (int64_t g = 0; g < groups; ++g) {
    const float s = half(sc[g]), m = mn ? half(mn[g]) : -w.offset * s;
    for (int64_t j = g * per_group; j < (g + 1) * per_group; ++j) {
      scales[j] = s;
      mins[j] = m;
    }
  }
}

// One 16-row panel of the weight as bf16, unpacked a block at a time: block b is the A tile (16 rows x
// 32 elements, 1 KB) at panel + b * 512. Rows past the weight's end are zero.
template <int Bits, bool Group16>
struct PanelUnpacker {
  const Weights& w;
  int64_t slices;  // scales per row: one per block, two for 16-element groups
  std::vector<float> scales, mins;  // [16][slices]
  const uint8_t* qs[kTile];
  const uint8_t* qh[kTile];
  int rows = 0;

  PanelUnpacker(const Weights& w) : w(w), slices(Group16 ? w.K / 16 : w.K / kBlock), scales(kTile * slices), mins(kTile * slices) {}

  // The next panel (the 16 rows after this one, contiguous in each array) is prefetched a share per
  // block while this one is unpacked: the rows are read 16 bytes at a time in 16 streams, which the
  // hardware prefetcher does not follow far enough ahead.
  const uint8_t* next_qs = nullptr;
  const uint8_t* next_qh = nullptr;
  const uint8_t* next_scale = nullptr;
  const uint8_t* next_min = nullptr;

  void start(int64_t n0, int live_rows) {
    const int64_t groups = w.K / w.group;
    next_qs = qs_row(w, n0 + kTile);
    next_qh = w.qh ? qh_row(w, n0 + kTile) : nullptr;
    next_scale = reinterpret_cast<const uint8_t*>(w.scale + (n0 + kTile) * groups);
    next_min = w.min ? reinterpret_cast<const uint8_t*>(w.min + (n0 + kTile) * groups) : nullptr;
    rows = live_rows;
    for (int r = 0; r < rows; ++r) {
      qs[r] = qs_row(w, n0 + r);
      qh[r] = qh_row(w, n0 + r);
      row_scales(w, n0 + r, scales.data() + r * slices, mins.data() + r * slices);
    }
  }

  void prefetch_next(int64_t b) const {
    constexpr int64_t kCodeBytes = Bits == 8 ? kBlock : 16, kPlaneBytes = Bits == 5 || Bits == 6 ? 4 * (Bits - 4) : 0;
    for (int64_t byte = 0; byte < kTile * kCodeBytes; byte += 64)
      _mm_prefetch(reinterpret_cast<const char*>(next_qs + b * kTile * kCodeBytes + byte), _MM_HINT_T0);
    if constexpr (kPlaneBytes > 0)
      for (int64_t byte = 0; byte < kTile * kPlaneBytes; byte += 64)
        _mm_prefetch(reinterpret_cast<const char*>(next_qh + b * kTile * kPlaneBytes + byte), _MM_HINT_T0);
    const int64_t scale_bytes = kTile * (w.K / w.group) * 2;  // 16 rows of fp16 scales: a line per block
    if (b * 64 < scale_bytes) {
      _mm_prefetch(reinterpret_cast<const char*>(next_scale + b * 64), _MM_HINT_T0);
      if (next_min) _mm_prefetch(reinterpret_cast<const char*>(next_min + b * 64), _MM_HINT_T0);
    }
  }

  void block(int64_t b, uint16_t* panel) const {
    uint16_t* dst = panel + b * kTile * kBlock;
    prefetch_next(b);
    for (int r = 0; r < kTile; ++r) {
      if (r >= rows) {
        _mm512_storeu_si512(dst + r * kBlock, _mm512_setzero_si512());
        continue;
      }
      const float* sc = scales.data() + r * slices + (Group16 ? 2 * b : b);
      const float* mn = mins.data() + r * slices + (Group16 ? 2 * b : b);
      const __m512 s0 = _mm512_set1_ps(sc[0]), m0 = _mm512_set1_ps(mn[0]);
      const __m512 s1 = Group16 ? _mm512_set1_ps(sc[1]) : s0, m1 = Group16 ? _mm512_set1_ps(mn[1]) : m0;
      if constexpr ((Bits == 4 || Bits == 5) && !Group16) {
        // A code has 16 or 32 values: look each up in a table of value = scale * code + min in bf16.
        const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __m512i idx, table;
        if constexpr (Bits == 4) {
          // Each 16-bit lane holds a whole byte of codes: the low lanes index with it as it is (the
          // high nibble lands in index bit 4, so the table repeats in both halves), the high lanes
          // with the high nibble.
          const __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs[r] + b * 16)));
          idx = _mm512_srlv_epi16(_mm512_cvtepu8_epi16(raw), _mm512_set_epi64(kHigh4, kHigh4, kHigh4, kHigh4, 0, 0, 0, 0));
          const __m256i t16 = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_fmadd_ps(iota, s0, m0)));
          table = _mm512_broadcast_i64x4(t16);
        } else {
          __m256i unused;
          idx = _mm512_cvtepu8_epi16(load_codes<Bits>(qs[r], qh[r], b, unused));
          const __m512 sixteen = _mm512_set1_ps(16.0f);
          table = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(_mm512_add_ps(iota, sixteen), s0, m0),
                                                                _mm512_fmadd_ps(iota, s0, m0)));
        }
        _mm512_storeu_si512(dst + r * kBlock, _mm512_permutexvar_epi16(idx, table));
        continue;
      }
      __m512 lo, hi;
      if constexpr (Bits == 8) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs[r] + b * kBlock));
        lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
        hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1)));
      } else {
        __m256i unused;
        const __m256i v = load_codes<Bits>(qs[r], qh[r], b, unused);
        lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(v)));
        hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(v, 1)));
      }
      lo = _mm512_fmadd_ps(lo, s0, m0);
      hi = _mm512_fmadd_ps(hi, s1, m1);
      _mm512_storeu_si512(dst + r * kBlock, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
    }
  }
};

// x [M, K] as B tiles: for activation tile t and block b, 16 rows (element pairs 2i, 2i + 1 of the
// block) x 16 activation rows, at (t * blocks + b) * 256 words. Rows past M are zero.
std::vector<uint32_t> pack_activations(const c10::BFloat16* x, int64_t M, int64_t K) {
  const int64_t tiles = (M + kTile - 1) / kTile, blocks = K / kBlock, pairs = K / 2;
  std::vector<uint32_t> packed(tiles * blocks * kTileWords, 0);
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin * kTile; m < std::min(M, end * kTile); ++m) {
      const auto* row = reinterpret_cast<const uint8_t*>(x + m * K);
      uint32_t* dst = packed.data() + (m / kTile) * blocks * kTileWords + m % kTile;
      for (int64_t p = 0; p < pairs; ++p) std::memcpy(dst + (p / kTile) * kTileWords + (p % kTile) * kTile, row + 4 * p, 4);
    }
  });
  return packed;
}

// T output tiles (activation tiles t0 .. t0 + T) of one panel, over all blocks, stored to c [T][16][16].
// With an unpacker, the panel is filled on the way: block b + 1 is unpacked while block b's products
// run, so the tile loads never wait for the stores that wrote their block.
template <int T, typename Unpacker>
void panel_product(uint16_t* panel, const uint32_t* xp, int64_t t0, int64_t blocks, float* c, const Unpacker* unpack) {
  static_assert(T >= 1 && T <= kMaxCTiles);
  _tile_zero(2);
  if constexpr (T > 1) _tile_zero(3);
  if constexpr (T > 2) _tile_zero(4);
  if constexpr (T > 3) _tile_zero(5);
  const uint32_t* b0 = xp + t0 * blocks * kTileWords;
  const int64_t tile_stride = blocks * kTileWords;
  if (unpack) unpack->block(0, panel);
  for (int64_t b = 0; b < blocks; ++b) {
    if (unpack && b + 1 < blocks) unpack->block(b + 1, panel);
    _tile_loadd(0, panel + b * kTile * kBlock, 64);
    const uint32_t* xb = b0 + b * kTileWords;
    _tile_loadd(1, xb, 64);
    _tile_dpbf16ps(2, 0, 1);
    if constexpr (T > 1) {
      _tile_loadd(7, xb + tile_stride, 64);
      _tile_dpbf16ps(3, 0, 7);
    }
    if constexpr (T > 2) {
      _tile_loadd(1, xb + 2 * tile_stride, 64);
      _tile_dpbf16ps(4, 0, 1);
    }
    if constexpr (T > 3) {
      _tile_loadd(7, xb + 3 * tile_stride, 64);
      _tile_dpbf16ps(5, 0, 7);
    }
  }
  _tile_stored(2, c, 64);
  if constexpr (T > 1) _tile_stored(3, c + kTileWords, 64);
  if constexpr (T > 2) _tile_stored(4, c + 2 * kTileWords, 64);
  if constexpr (T > 3) _tile_stored(5, c + 3 * kTileWords, 64);
}

// The 16 x 16 floats at c (row r at c + 16 r), transposed: cols[i] holds c[0..16][i].
inline void transpose16(const float* c, __m512 cols[16]) {
  __m512 t[16], u[16];
  for (int j = 0; j < 8; ++j) {
    const __m512 a = _mm512_load_ps(c + 32 * j), b = _mm512_load_ps(c + 32 * j + 16);
    t[2 * j] = _mm512_unpacklo_ps(a, b);  // per 128-bit lane: a0 b0 a1 b1
    t[2 * j + 1] = _mm512_unpackhi_ps(a, b);  // a2 b2 a3 b3
  }
  for (int g = 0; g < 4; ++g) {  // rows 4g .. 4g + 3, per lane: one column (mod 4) of the four rows
    const __m512d lo0 = _mm512_castps_pd(t[4 * g]), lo1 = _mm512_castps_pd(t[4 * g + 2]);
    const __m512d hi0 = _mm512_castps_pd(t[4 * g + 1]), hi1 = _mm512_castps_pd(t[4 * g + 3]);
    u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo0, lo1));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo0, lo1));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi0, hi1));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi0, hi1));
  }
  for (int k = 0; k < 4; ++k) {  // lane l of u[4g + k] holds column 4l + k of rows 4g .. 4g + 3
    const __m512 p0 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x88), p1 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xdd);
    const __m512 q0 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x88), q1 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xdd);
    cols[k] = _mm512_shuffle_f32x4(p0, q0, 0x88);
    cols[k + 8] = _mm512_shuffle_f32x4(p0, q0, 0xdd);
    cols[k + 4] = _mm512_shuffle_f32x4(p1, q1, 0x88);
    cols[k + 12] = _mm512_shuffle_f32x4(p1, q1, 0xdd);
  }
}

template <int Bits, bool Group16>
void amx_rows(const Weights& w, const uint32_t* xp, const c10::BFloat16* bias, c10::BFloat16* out, int64_t M,
              int64_t N, int64_t begin, int64_t end, uint16_t* panel) {
  const int64_t blocks = w.K / kBlock, tiles = (M + kTile - 1) / kTile;
  PanelUnpacker<Bits, Group16> unpacker(w);
  alignas(64) float c[kMaxCTiles * kTileWords];
  for (int64_t n0 = begin; n0 < end; n0 += kTile) {
    const int rows = static_cast<int>(std::min<int64_t>(kTile, end - n0));
    const __mmask16 valid = static_cast<__mmask16>((1u << rows) - 1);
    const __m512 add = bias ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(valid, bias + n0)), 16))
                            : _mm512_setzero_ps();
    unpacker.start(n0, rows);
    for (int64_t t0 = 0; t0 < tiles; t0 += kMaxCTiles) {
      const auto* unpack = t0 == 0 ? &unpacker : nullptr;  // the first pass fills the panel
      with_count<kMaxCTiles>(tiles - t0, [&](auto n) {
        panel_product<decltype(n)::value>(panel, xp, t0, blocks, c, unpack);
      });
      // c[t][r][i] is output n0 + r of activation row (t0 + t) * 16 + i.
      for (int64_t t = 0; t < std::min<int64_t>(kMaxCTiles, tiles - t0); ++t) {
        __m512 cols[kTile];
        transpose16(c + t * kTileWords, cols);
        for (int i = 0; i < kTile; ++i) {
          const int64_t m = (t0 + t) * kTile + i;
          if (m >= M) break;
          const __m256i v = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_add_ps(cols[i], add)));
          _mm256_mask_storeu_epi16(out + m * N + n0, valid, v);
        }
      }
    }
  }
}

}  // namespace

bool amx_ready() {
  // Linux hands a process the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM).
  static const bool ready = [] {
    if (const char* off = std::getenv("LOOM_DISABLE_AMX"); off && std::string(off) == "1") return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtileData) == 0;
  }();
  return ready;
}

void amx_matmul(const c10::BFloat16* x, const Weights& w, const c10::BFloat16* bias, c10::BFloat16* out, int64_t M,
                int64_t N) {
  const std::vector<uint32_t> xp = pack_activations(x, M, w.K);
  parallel_chunks(N, [&](int64_t begin, int64_t end) {
    load_tile_config();
    std::vector<uint16_t> panel(kTile * w.K);
    switch (w.bits) {  // 16-element groups: 6-bit (Q6_K) only
      case 4: amx_rows<4, false>(w, xp.data(), bias, out, M, N, begin, end, panel.data()); break;
      case 5: amx_rows<5, false>(w, xp.data(), bias, out, M, N, begin, end, panel.data()); break;
      case 6:
        if (w.group == 16) amx_rows<6, true>(w, xp.data(), bias, out, M, N, begin, end, panel.data());
        else amx_rows<6, false>(w, xp.data(), bias, out, M, N, begin, end, panel.data());
        break;
      default: amx_rows<8, false>(w, xp.data(), bias, out, M, N, begin, end, panel.data()); break;
    }
    _tile_release();
  });
}

}  // namespace loom_quant
#elif defined(LOOM_QUANT_KERNELS)
namespace loom_quant {
bool amx_ready() { return false; }
void amx_matmul(const c10::BFloat16*, const Weights&, const c10::BFloat16*, c10::BFloat16*, int64_t, int64_t) {
  TORCH_CHECK(false, "built without AMX-BF16");
}
}  // namespace loom_quant
#endif
