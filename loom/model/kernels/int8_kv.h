// The int8 KV cache's layout, shared by its writer (kv_write, fused_ops.cpp) and its reader
// (decode_attention, paged_attention.cpp); loom/model/kv_cache.py's Int8KVCache is the Python side.
#pragma once

#include <torch/extension.h>

#include "cpu_check.h"

// Dims per key scale (a value has one scale per token and head): INT8_KEY_GROUP in kv_cache.py.
constexpr int64_t kInt8KeyGroup = 16;

// The scales that go with one int8 cache layer [blocks, heads, block_size, head_dim]: fp16 key scales
// [blocks, heads, head_dim / 16, block_size] and value scales [blocks, heads, block_size].
inline void check_int8_kv_scales(const torch::Tensor& cache, const torch::Tensor& key_scales,
                                 const torch::Tensor& value_scales) {
  LOOM_CHECK_CPU(key_scales);
  LOOM_CHECK_CPU(value_scales);
  const int64_t nb = cache.size(0), h = cache.size(1), bs = cache.size(2), d = cache.size(3);
  TORCH_CHECK(d % kInt8KeyGroup == 0, "an int8 cache needs head_dim to be a multiple of ", kInt8KeyGroup);
  TORCH_CHECK(key_scales.scalar_type() == at::kHalf && key_scales.is_contiguous() &&
              key_scales.sizes() == at::IntArrayRef({nb, h, d / kInt8KeyGroup, bs}),
              "key scales must be contiguous fp16 [blocks, heads, head_dim / 16, block_size]");
  TORCH_CHECK(value_scales.scalar_type() == at::kHalf && value_scales.is_contiguous() &&
              value_scales.sizes() == at::IntArrayRef({nb, h, bs}),
              "value scales must be contiguous fp16 [blocks, heads, block_size]");
}
