// CPU kernel of sm4::expert_histogram: per-expert assignment counts and int64 offsets.
//
// Parallel over assignments: each thread fills its own histogram row, then the rows are summed
// in a fixed order (integer sums, so the result is exact and deterministic). Unlike the GPU
// kernels, this one checks every id and raises on one outside [-1, E): on the CPU that check
// costs no host sync.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"

#include <atomic>
#include <vector>

namespace sm4 {
namespace {

template <typename index_t>
void count_assignments(const index_t* ids, int64_t num_assignments, int64_t num_experts,
                       int64_t* counts) {
  const int64_t num_threads = at::get_num_threads();
  std::vector<int64_t> per_thread(static_cast<size_t>(num_threads * num_experts), 0);
  std::atomic<int64_t> first_bad{-1};
  // A grain of 32k assignments keeps threads busy for ~10 us each: below that, fork/join costs
  // more than the counting.
  at::parallel_for(0, num_assignments, 32768, [&](int64_t begin, int64_t end) {
    int64_t* local = per_thread.data() + at::get_thread_num() * num_experts;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t expert = static_cast<int64_t>(ids[i]);
      if (expert >= 0 && expert < num_experts) {
        ++local[expert];
      } else if (expert != -1) {
        int64_t expected = -1;
        first_bad.compare_exchange_strong(expected, i);
      }
    }
  });
  const int64_t bad = first_bad.load();
  TORCH_CHECK_VALUE(bad < 0, "sm4.expert_histogram: expert_ids must lie in [-1, num_experts=",
              num_experts, "), but entry ", bad, " (flat index) is ", static_cast<int64_t>(ids[bad]));
  for (int64_t e = 0; e < num_experts; ++e) counts[e] = 0;
  for (int64_t t = 0; t < num_threads; ++t)
    for (int64_t e = 0; e < num_experts; ++e) counts[e] += per_thread[t * num_experts + e];
}

std::tuple<at::Tensor, at::Tensor> expert_histogram_cpu(const at::Tensor& expert_ids,
                                                        int64_t num_experts) {
  check_expert_ids(expert_ids, num_experts, "sm4.expert_histogram");
  const at::Tensor ids = expert_ids.contiguous();
  at::Tensor counts = at::empty({num_experts}, expert_ids.options().dtype(at::kLong));
  at::Tensor offsets = at::empty({num_experts + 1}, expert_ids.options().dtype(at::kLong));
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "expert_histogram_cpu", [&] {
    count_assignments<index_t>(ids.data_ptr<index_t>(), ids.numel(), num_experts,
                               counts.data_ptr<int64_t>());
  });
  // Exclusive prefix sum: offsets[e] is the first row of expert e in expert order.
  const int64_t* c = counts.data_ptr<int64_t>();
  int64_t* o = offsets.data_ptr<int64_t>();
  o[0] = 0;
  for (int64_t e = 0; e < num_experts; ++e) o[e + 1] = o[e] + c[e];
  return {counts, offsets};
}

}  // namespace

TORCH_LIBRARY_IMPL(sm4, CPU, m) { m.impl("expert_histogram", &expert_histogram_cpu); }

}  // namespace sm4
