// The native kernels' entry points, defined in this directory's .cpp files: what the Python module
// binds (paged_attention.cpp) and what the fused decode stack calls (decoder_stack.cpp).
#pragma once

#include <torch/extension.h>

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor block_tables, torch::Tensor context_lens, double scale, int64_t window,
                               c10::optional<torch::Tensor> k_scales, c10::optional<torch::Tensor> v_scales);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps, double offset);
torch::Tensor add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor w, double eps, double offset);
void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor act_and_mul(torch::Tensor gate_up, int64_t act);
void kv_write(torch::Tensor keys, torch::Tensor values, torch::Tensor k, torch::Tensor v, torch::Tensor blocks,
              torch::Tensor offsets, c10::optional<torch::Tensor> key_scales, c10::optional<torch::Tensor> value_scales);
std::tuple<torch::Tensor, torch::Tensor> kv_gather_int8(torch::Tensor keys, torch::Tensor values,
                                                        torch::Tensor key_scales, torch::Tensor value_scales,
                                                        torch::Tensor block_ids, int64_t length, at::ScalarType dtype);
void kivi_seal(torch::Tensor keys, torch::Tensor key_scales, torch::Tensor key_zeros, torch::Tensor values,
               torch::Tensor value_scales, torch::Tensor value_zeros, torch::Tensor k, torch::Tensor v,
               torch::Tensor blocks, int64_t bits);
void kivi_write(torch::Tensor keys, torch::Tensor key_scales, torch::Tensor key_zeros, torch::Tensor values,
                torch::Tensor value_scales, torch::Tensor value_zeros, torch::Tensor residual_k,
                torch::Tensor residual_v, torch::Tensor k, torch::Tensor v, torch::Tensor seal_blocks,
                torch::Tensor seal_rows_from_residual, torch::Tensor residual_blocks, torch::Tensor residual_offsets,
                torch::Tensor seal_rows_from_step, torch::Tensor step_rows, torch::Tensor open_rows,
                torch::Tensor open_blocks, torch::Tensor open_offsets, int64_t bits);
torch::Tensor decode_attention_kivi(torch::Tensor q, torch::Tensor k_codes, torch::Tensor v_codes,
                                    torch::Tensor k_scales, torch::Tensor k_zeros, torch::Tensor v_scales,
                                    torch::Tensor v_zeros, torch::Tensor residual_k, torch::Tensor residual_v,
                                    torch::Tensor block_tables, torch::Tensor context_lens, torch::Tensor slots,
                                    int64_t bits, int64_t residual_tokens, double scale, int64_t window);
torch::Tensor linear_small_batch(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
bool has_linear_small_batch();
torch::Tensor quant_matmul(torch::Tensor x, torch::Tensor qs, c10::optional<torch::Tensor> qh, torch::Tensor scale,
                           c10::optional<torch::Tensor> min, int64_t bits, int64_t group, double offset,
                           c10::optional<torch::Tensor> bias);
torch::Tensor quant_dequantize(torch::Tensor qs, c10::optional<torch::Tensor> qh, torch::Tensor scale,
                               c10::optional<torch::Tensor> min, int64_t bits, int64_t group, double offset,
                               int64_t K, at::ScalarType dtype);
bool has_quant_matmul();
bool has_amx_matmul();
void register_decoder_stack(pybind11::module& m);
void shm_all_reduce(torch::Tensor x, torch::Tensor region, int64_t rank, int64_t world, int64_t slot_bytes,
                    int64_t seq, std::vector<int64_t> watch_fds);
int64_t shm_header_bytes(int64_t world);
