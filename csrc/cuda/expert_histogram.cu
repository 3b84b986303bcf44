// CUDA kernels of sm4::expert_histogram (no torch headers: see launchers.h).
//
// Pass 1 counts into a per-block shared-memory histogram (integer atomics: exact and
// order-independent) and adds it to the global int64 counts. Pass 2, one block, turns the counts
// into exclusive int64 offsets with cub::BlockScan, tile by tile with a running prefix.

#include <cub/block/block_scan.cuh>

#include "emulation_seams.cuh"
#include "launchers.h"

namespace sm4::cuda {
namespace {

constexpr int kHistogramThreads = 256;
constexpr int kScanThreads = 256;
// Above this many experts the shared histogram would not fit in the default 48 KiB: count
// straight into global memory instead.
constexpr int64_t kMaxSharedExperts = 12 * 1024;

__global__ void zero_counts_kernel(unsigned long long* counts, int64_t num_experts) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < num_experts;
       e += int64_t(gridDim.x) * blockDim.x)
    counts[e] = 0;
}

template <typename index_t, bool kShared>
__global__ void histogram_kernel(const index_t* __restrict__ ids, int64_t num_assignments,
                                 int64_t num_experts, unsigned long long* __restrict__ counts) {
  SM4_DYNAMIC_SHARED(unsigned int, block_counts);
  if (kShared) {
    for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) block_counts[e] = 0;
    __syncthreads();
  }
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < num_assignments;
       i += stride) {
    const int64_t expert = static_cast<int64_t>(ids[i]);
    if (expert < 0 || expert >= num_experts) continue;
    if (kShared) {
      atomicAdd(&block_counts[expert], 1u);
    } else {
      atomicAdd(&counts[expert], 1ull);
    }
  }
  if (kShared) {
    __syncthreads();
    for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x)
      if (block_counts[e] != 0) atomicAdd(&counts[e], static_cast<unsigned long long>(block_counts[e]));
  }
}

__global__ void exclusive_scan_kernel(const int64_t* __restrict__ counts, int64_t num_experts,
                                      int64_t* __restrict__ offsets) {
  using BlockScan = cub::BlockScan<long long, kScanThreads>;
  __shared__ typename BlockScan::TempStorage temp;
  __shared__ long long carry;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < num_experts; base += kScanThreads) {
    const int64_t e = base + threadIdx.x;
    const long long count = e < num_experts ? counts[e] : 0;
    long long prefix, tile_total;
    BlockScan(temp).ExclusiveSum(count, prefix, tile_total);
    if (e < num_experts) offsets[e] = carry + prefix;
    __syncthreads();  // everyone has read `carry` before thread 0 moves it on
    if (threadIdx.x == 0) carry += tile_total;
    __syncthreads();
  }
  if (threadIdx.x == 0) offsets[num_experts] = carry;
}

template <typename index_t>
void launch_count(const index_t* ids, int64_t num_assignments, int64_t num_experts,
                  unsigned long long* counts, cudaStream_t stream) {
  // Enough blocks to fill the GPU, few enough that flushing the shared histograms stays cheap.
  const int64_t wanted = (num_assignments + kHistogramThreads - 1) / kHistogramThreads;
  const int blocks = static_cast<int>(wanted < 1024 ? (wanted < 1 ? 1 : wanted) : 1024);
  if (num_experts <= kMaxSharedExperts) {
    const size_t shared = static_cast<size_t>(num_experts) * sizeof(unsigned int);
    SM4_LAUNCH(blocks, kHistogramThreads, shared, stream, histogram_kernel<index_t, true>)(ids, num_assignments, num_experts, counts);
  } else {
    SM4_LAUNCH(blocks, kHistogramThreads, 0, stream, histogram_kernel<index_t, false>)(ids, num_assignments, num_experts, counts);
  }
}

}  // namespace

cudaError_t launch_expert_histogram(const void* expert_ids, bool ids_are_int64,
                                    int64_t num_assignments, int64_t num_experts, int64_t* counts,
                                    int64_t* offsets, cudaStream_t stream) {
  auto* counts_u64 = reinterpret_cast<unsigned long long*>(counts);
  SM4_LAUNCH(1, 256, 0, stream, zero_counts_kernel)(counts_u64, num_experts);
  if (num_assignments > 0) {
    if (ids_are_int64) {
      launch_count(static_cast<const int64_t*>(expert_ids), num_assignments, num_experts,
                   counts_u64, stream);
    } else {
      launch_count(static_cast<const int32_t*>(expert_ids), num_assignments, num_experts,
                   counts_u64, stream);
    }
  }
  SM4_LAUNCH(1, kScanThreads, 0, stream, exclusive_scan_kernel)(counts, num_experts, offsets);
  return cudaGetLastError();
}

}  // namespace sm4::cuda
