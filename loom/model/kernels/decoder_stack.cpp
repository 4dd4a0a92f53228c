// A decode step through a whole Llama-family decoder stack in one native call: per layer, norm ->
// q/k/v -> rotary -> cache write -> paged attention -> o -> residual + norm -> gate/up ->
// activation -> down, calling the same kernels as the module-by-module forward. At the default
// model's size (30 layers, hidden 576) the Python between those kernels cost as much as the kernels
// themselves. loom/model/fused_decode.py builds the stack and decides when it applies.
#include <torch/extension.h>

#include <chrono>
#include <tuple>
#include <vector>

#include "ops.h"

namespace {

constexpr int64_t kSmallBatchRows = 8;  // loom.model.layers.SMALL_BATCH_ROWS

// One packed row segment: PackedWeight._kernel_args (qs, qh, scale, min, bits, group, offset).
using Segment = std::tuple<torch::Tensor, c10::optional<torch::Tensor>, torch::Tensor, c10::optional<torch::Tensor>,
                           int64_t, int64_t, double>;

torch::Tensor segment_matmul(const torch::Tensor& x, const Segment& s, const c10::optional<torch::Tensor>& bias) {
  return quant_matmul(x, std::get<0>(s), std::get<1>(s), std::get<2>(s), std::get<3>(s), std::get<4>(s),
                      std::get<5>(s), std::get<6>(s), bias);
}

}  // namespace

// One projection, as loom.model.layers.Linear computes it: packed row segments (one per run of one
// format), or a dense weight.
struct Projection {
  std::vector<Segment> segments;
  c10::optional<torch::Tensor> weight;
  c10::optional<torch::Tensor> bias;

  Projection(std::vector<Segment> segments, c10::optional<torch::Tensor> weight, c10::optional<torch::Tensor> bias)
      : segments(std::move(segments)), weight(std::move(weight)), bias(std::move(bias)) {
    TORCH_CHECK(this->segments.empty() != !this->weight.has_value(), "a projection is packed or dense, not both");
  }

  torch::Tensor operator()(const torch::Tensor& x) const {
    if (segments.empty()) {
      if (x.scalar_type() == at::kBFloat16 && x.size(0) <= kSmallBatchRows && x.size(1) % 32 == 0 &&
          has_linear_small_batch())
        return linear_small_batch(x, *weight, bias);
      return at::linear(x, *weight, bias);
    }
    if (segments.size() == 1) return segment_matmul(x, segments[0], bias);
    std::vector<torch::Tensor> parts;
    for (const auto& s : segments) parts.push_back(segment_matmul(x, s, c10::nullopt));
    auto y = torch::cat(parts, -1);
    return bias ? y + *bias : y;
  }
};

struct DecoderLayer {
  torch::Tensor input_norm, post_norm;
  Projection qkv, o, gate_up, down;
};

class DecoderStack {
 public:
  DecoderStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, int64_t act, double scale,
               torch::Tensor final_norm)
      : num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim), eps_(eps), act_(act), scale_(scale),
        final_norm_(std::move(final_norm)) {}

  void add_layer(torch::Tensor input_norm, torch::Tensor post_norm, Projection qkv, Projection o, Projection gate_up,
                 Projection down) {
    layers_.push_back({std::move(input_norm), std::move(post_norm), std::move(qkv), std::move(o), std::move(gate_up),
                       std::move(down)});
  }

  // One rank of a tensor-parallel model: the o and down outputs are partial sums, summed over the
  // ranks through the shared region (see all_reduce.cpp) with sequence numbers seq, seq + 1, ...
  // (two per layer) from the `seq` each forward call gets.
  void set_tensor_parallel(torch::Tensor region, int64_t rank, int64_t world, int64_t slot_bytes,
                           std::vector<int64_t> watch_fds) {
    tp_ = TensorParallel{std::move(region), rank, world, slot_bytes, std::move(watch_fds)};
  }

  // Seconds spent in the all-reduces since the last call.
  double take_all_reduce_seconds() {
    const double s = all_reduce_seconds_;
    all_reduce_seconds_ = 0.0;
    return s;
  }

  // x: the embedded tokens [T, hidden], every row a decode row; cos/sin: [T, head_dim / 2]; keys/values:
  // the cache's layers, key_scales/value_scales an int8 cache's scales (empty for a plain cache); the
  // rest as AttentionMetadata holds them. Returns the final-normed hidden states.
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const std::vector<torch::Tensor>& keys, const std::vector<torch::Tensor>& values,
                        const std::vector<torch::Tensor>& key_scales, const std::vector<torch::Tensor>& value_scales,
                        const torch::Tensor& block_tables, const torch::Tensor& context_lens,
                        const torch::Tensor& slot_blocks, const torch::Tensor& slot_offsets, int64_t seq) {
    TORCH_CHECK(keys.size() == layers_.size() && values.size() == layers_.size(), "one cache layer per decoder layer");
    const bool scaled = !key_scales.empty();
    TORCH_CHECK(!scaled || (key_scales.size() == layers_.size() && value_scales.size() == layers_.size()),
                "one scale layer per decoder layer");
    return run(x, cos, sin, seq, [&](size_t l, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
      c10::optional<torch::Tensor> ks, vs;
      if (scaled) ks = key_scales[l], vs = value_scales[l];
      kv_write(keys[l], values[l], k, v, slot_blocks, slot_offsets, ks, vs);
      return decode_attention(q, keys[l], values[l], block_tables, context_lens, scale_, 0, ks, vs);
    });
  }

  // The same over a KIVI cache: layers[l] is KiviKVCache.layer_tensors(l), writes the step's
  // ResidualWrites tensors in order (seal_blocks, seal_from_residual, seal_from_step, open_rows).
  torch::Tensor forward_kivi(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin,
                             const std::vector<std::vector<torch::Tensor>>& layers,
                             const std::vector<torch::Tensor>& writes, const torch::Tensor& block_tables,
                             const torch::Tensor& context_lens, const torch::Tensor& slots, int64_t bits,
                             int64_t residual_tokens, int64_t seq) {
    TORCH_CHECK(layers.size() == layers_.size(), "one cache layer per decoder layer");
    TORCH_CHECK(writes.size() == 9, "the residual writes are 9 tensors");
    for (const auto& c : layers) TORCH_CHECK(c.size() == 8, "a KIVI cache layer is 8 tensors");
    return run(x, cos, sin, seq, [&](size_t l, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
      const auto& c = layers[l];
      kivi_write(c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], k, v, writes[0], writes[1], writes[2], writes[3],
                 writes[4], writes[5], writes[6], writes[7], writes[8], bits);
      return decode_attention_kivi(q, c[0], c[3], c[1], c[2], c[4], c[5], c[6], c[7], block_tables, context_lens,
                                   slots, bits, residual_tokens, scale_, 0);
    });
  }

 private:
  struct TensorParallel {
    torch::Tensor region;
    int64_t rank, world, slot_bytes;
    std::vector<int64_t> watch_fds;
  };

  // The partial sum `y` summed over the ranks (in place), when this is one rank of several.
  torch::Tensor reduced(torch::Tensor y, int64_t& seq) {
    if (!tp_) return y;
    const auto t0 = std::chrono::steady_clock::now();
    shm_all_reduce(y, tp_->region, tp_->rank, tp_->world, tp_->slot_bytes, seq++, tp_->watch_fds);
    all_reduce_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return y;
  }

  // The layers, with `attend(layer, q, k, v)` writing the cache and returning the attention output.
  template <typename Attend>
  torch::Tensor run(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin, int64_t seq,
                    const Attend& attend) {
    const int64_t T = x.size(0), q_size = num_heads_ * head_dim_, kv_size = num_kv_heads_ * head_dim_;
    torch::Tensor residual;
    for (size_t l = 0; l < layers_.size(); ++l) {
      const DecoderLayer& L = layers_[l];
      torch::Tensor h;
      if (l == 0) {
        h = rms_norm(x, L.input_norm, eps_, 0.0);
        residual = x;
      } else {
        h = add_rms_norm(x, residual, L.input_norm, eps_, 0.0);
      }
      const torch::Tensor qkv = L.qkv(h);
      const torch::Tensor qk = qkv.narrow(1, 0, q_size + kv_size).view({T, num_heads_ + num_kv_heads_, head_dim_});
      rotary_(qk, cos, sin);
      const torch::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({T, num_kv_heads_, head_dim_});
      const torch::Tensor attn = attend(l, qk.narrow(1, 0, num_heads_), qk.narrow(1, num_heads_, num_kv_heads_), v);
      h = add_rms_norm(reduced(L.o(attn.reshape({T, q_size})), seq), residual, L.post_norm, eps_, 0.0);
      x = reduced(L.down(act_and_mul(L.gate_up(h), act_)), seq);
    }
    return add_rms_norm(x, residual, final_norm_, eps_, 0.0);
  }

  int64_t num_heads_, num_kv_heads_, head_dim_;
  double eps_;
  int64_t act_;
  double scale_;
  torch::Tensor final_norm_;
  std::vector<DecoderLayer> layers_;
  c10::optional<TensorParallel> tp_;
  double all_reduce_seconds_ = 0.0;
};

void register_decoder_stack(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<Projection>(m, "Projection")
      .def(py::init<std::vector<Segment>, c10::optional<torch::Tensor>, c10::optional<torch::Tensor>>(),
           py::arg("segments"), py::arg("weight"), py::arg("bias"))
      .def("__call__", &Projection::operator(), py::arg("x"));
  py::class_<DecoderStack>(m, "DecoderStack")
      .def(py::init<int64_t, int64_t, int64_t, double, int64_t, double, torch::Tensor>(), py::arg("num_heads"),
           py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("eps"), py::arg("act"), py::arg("scale"),
           py::arg("final_norm"))
      .def("add_layer", &DecoderStack::add_layer)
      .def("set_tensor_parallel", &DecoderStack::set_tensor_parallel)
      .def("take_all_reduce_seconds", &DecoderStack::take_all_reduce_seconds)
      .def("forward", &DecoderStack::forward, py::call_guard<py::gil_scoped_release>())
      .def("forward_kivi", &DecoderStack::forward_kivi, py::call_guard<py::gil_scoped_release>());
}
