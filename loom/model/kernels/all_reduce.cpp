// The all-reduce of tensor-parallel ranks on one machine, through a shared-memory region.
//
// Region: one 64-byte line per rank holding its sequence number, then two sets (alternating by
// sequence parity) of one slot per rank. A rank copies its tensor into its slot, publishes the
// sequence number, waits until every rank has published it, and sums the slots in rank order, so
// every rank computes the same bits. Two sets suffice: a rank can write the next all-reduce's slot
// while the others still read this one's, but no further, since the one after needs their next
// sequence number, which they publish only after reading.
//
// A rank that is gone would leave the others waiting forever: while they wait they poll the pipes to
// the other processes, which become readable when the far end exits (or writes its error).
#include <immintrin.h>
#include <poll.h>
#include <sched.h>

#include <cstring>
#include <stdexcept>
#include <vector>

#include "ops.h"

namespace {

constexpr int64_t kLine = 64;          // bytes per rank's sequence number: one cache line each
constexpr int kSpinsBeforeYield = 2000;  // about 50-100 us of pause instructions
constexpr int kYieldsPerPoll = 64;

int64_t* sequence_of(uint8_t* base, int64_t rank) { return reinterpret_cast<int64_t*>(base + rank * kLine); }

void wait_for(uint8_t* base, int64_t world, int64_t rank, int64_t seq, const std::vector<int64_t>& watch_fds) {
  std::vector<pollfd> fds;
  for (int64_t fd : watch_fds) fds.push_back(pollfd{static_cast<int>(fd), POLLIN, 0});
  for (int64_t r = 0; r < world; ++r) {
    if (r == rank) continue;
    int64_t* s = sequence_of(base, r);
    int spins = 0, yields = 0;
    while (__atomic_load_n(s, __ATOMIC_ACQUIRE) < seq) {
      if (++spins < kSpinsBeforeYield) {
        _mm_pause();
        continue;
      }
      sched_yield();
      if (++yields % kYieldsPerPoll == 0 && !fds.empty() && poll(fds.data(), fds.size(), 0) > 0)
        throw std::runtime_error("a tensor-parallel rank is gone (its pipe closed or reported an error)");
    }
  }
}

template <typename T>
void sum_slots(T* out, const uint8_t* slots, int64_t world, int64_t slot_bytes, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float acc = 0.f;
    for (int64_t r = 0; r < world; ++r) acc += static_cast<float>(reinterpret_cast<const T*>(slots + r * slot_bytes)[i]);
    out[i] = static_cast<T>(acc);
  }
}

}  // namespace

void shm_all_reduce(torch::Tensor x, torch::Tensor region, int64_t rank, int64_t world, int64_t slot_bytes,
                    int64_t seq, std::vector<int64_t> watch_fds) {
  TORCH_CHECK(x.is_cpu() && x.is_contiguous(), "shm_all_reduce needs a contiguous CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "shm_all_reduce sums fp32 or bf16");
  const int64_t nbytes = x.numel() * x.element_size();
  TORCH_CHECK(nbytes <= slot_bytes, "tensor of ", nbytes, " bytes exceeds the shared slot of ", slot_bytes);
  uint8_t* base = region.data_ptr<uint8_t>();
  uint8_t* slots = base + world * kLine + (seq & 1) * world * slot_bytes;
  std::memcpy(slots + rank * slot_bytes, x.data_ptr(), nbytes);
  __atomic_store_n(sequence_of(base, rank), seq, __ATOMIC_RELEASE);
  wait_for(base, world, rank, seq, watch_fds);
  if (x.scalar_type() == at::kFloat)
    sum_slots(x.data_ptr<float>(), slots, world, slot_bytes, x.numel());
  else
    sum_slots(x.data_ptr<at::BFloat16>(), slots, world, slot_bytes, x.numel());
}

int64_t shm_header_bytes(int64_t world) { return world * kLine; }
