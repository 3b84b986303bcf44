// CUDA kernels of token permutation (no torch headers: see launchers.h).
//
// Metadata: a stable counting sort over E + 1 bins. Pass 1 counts each block's bins in shared
// memory (integer atomics: exact); the binding turns the counts into block start rows with int64
// cumsums; pass 2 places each assignment at start + its rank among the earlier assignments of its
// block and bin (counted, not atomically claimed: stable and deterministic).
// Rows: one block per token walks its ranks in order; nothing is scatter-added.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "float_convert.cuh"
#include "emulation_seams.cuh"
#include "launchers.h"

namespace sm4::cuda {
namespace {

constexpr int kRowThreads = 256;


__device__ __forceinline__ int64_t bin_of(int64_t expert, int64_t num_experts) {
  return expert < 0 || expert >= num_experts ? num_experts : expert;
}

__global__ void bin_counts_kernel(const int64_t* __restrict__ ids, int64_t n, int64_t num_experts,
                                  int64_t* __restrict__ block_counts) {
  SM4_DYNAMIC_SHARED(unsigned int, counts);
  const int64_t bins = num_experts + 1;
  for (int64_t e = threadIdx.x; e < bins; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  const int64_t i = blockIdx.x * kSortBlock + threadIdx.x;
  if (i < n) atomicAdd(&counts[bin_of(ids[i], num_experts)], 1u);
  __syncthreads();
  for (int64_t e = threadIdx.x; e < bins; e += blockDim.x) block_counts[blockIdx.x * bins + e] = counts[e];
}

__global__ void metadata_scatter_kernel(const int64_t* __restrict__ ids, const int64_t* __restrict__ block_start,
                                        int64_t n, int64_t num_experts, int64_t k,
                                        int64_t* __restrict__ sorted_assignment, int64_t* __restrict__ sorted_token,
                                        int64_t* __restrict__ assignment_row) {
  __shared__ int64_t block_bins[kSortBlock];
  const int64_t i = blockIdx.x * kSortBlock + threadIdx.x;
  const int64_t bin = i < n ? bin_of(ids[i], num_experts) : -1;
  block_bins[threadIdx.x] = bin;
  __syncthreads();
  if (i >= n) return;
  int64_t rank = 0;
  for (int j = 0; j < static_cast<int>(threadIdx.x); ++j) rank += block_bins[j] == bin;
  const int64_t row = block_start[blockIdx.x * (num_experts + 1) + bin] + rank;
  sorted_assignment[row] = i;
  sorted_token[row] = i / k;
  assignment_row[i] = bin < num_experts ? row : -1;
}

template <typename T>
__global__ void scatter_rows_kernel(const T* __restrict__ x, const int64_t* __restrict__ rows, int64_t k, int64_t dim,
                                    T* __restrict__ out) {
  const int64_t t = blockIdx.x;
  for (int64_t r = 0; r < k; ++r) {
    const int64_t row = rows[t * k + r];
    if (row < 0) continue;
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) out[row * dim + c] = x[t * dim + c];
  }
}

template <typename T>
__global__ void zero_rows_kernel(T* __restrict__ out, const int64_t* __restrict__ first_row, int64_t num_rows, int64_t dim) {
  const int64_t start = *first_row * dim, end = num_rows * dim;
  for (int64_t i = start + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < end; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_float<T>(0.f);
}

template <typename T>
__global__ void combine_rows_kernel(const T* __restrict__ src, const float* __restrict__ weights,
                                    const int64_t* __restrict__ rows, int64_t k, int64_t dim, T* __restrict__ out) {
  const int64_t t = blockIdx.x;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
    float acc = 0.f;
    for (int64_t r = 0; r < k; ++r) {
      const int64_t row = rows[t * k + r];
      if (row < 0) continue;  // inactive: adds exactly nothing
      acc += (weights ? weights[t * k + r] : 1.f) * to_float(src[row * dim + c]);
    }
    out[t * dim + c] = from_float<T>(acc);
  }
}

template <typename T>
__global__ void unpermute_backward_kernel(const T* __restrict__ grad_y, const T* __restrict__ y_sorted,
                                          const float* __restrict__ gates, const int64_t* __restrict__ rows,
                                          int64_t k, int64_t dim, T* __restrict__ grad_sorted,
                                          float* __restrict__ grad_gates) {
  __shared__ float partial[kRowThreads];
  const int64_t t = blockIdx.x;
  for (int64_t r = 0; r < k; ++r) {
    const int64_t row = rows[t * k + r];
    if (row < 0) {
      if (threadIdx.x == 0) grad_gates[t * k + r] = 0.f;
      continue;
    }
    const float gate = gates[t * k + r];
    float dot = 0.f;
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
      const float g = to_float(grad_y[t * dim + c]);
      grad_sorted[row * dim + c] = from_float<T>(gate * g);
      dot += g * to_float(y_sorted[row * dim + c]);
    }
    // Fixed-order tree reduction in shared memory: deterministic.
    partial[threadIdx.x] = dot;
    __syncthreads();
    for (int stride = kRowThreads / 2; stride > 0; stride >>= 1) {
      if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
      __syncthreads();
    }
    if (threadIdx.x == 0) grad_gates[t * k + r] = partial[0];
    __syncthreads();
  }
}

template <template <typename> class Launch, typename... Args>
cudaError_t by_type(FloatType type, Args&&... args) {
  switch (type) {
    case FloatType::kFloat32: return Launch<float>::run(std::forward<Args>(args)...);
    case FloatType::kFloat16: return Launch<__half>::run(std::forward<Args>(args)...);
    default: return Launch<__nv_bfloat16>::run(std::forward<Args>(args)...);
  }
}

template <typename T>
struct ScatterRows {
  static cudaError_t run(const void* x, const int64_t* rows, int64_t tokens, int64_t k, int64_t dim, void* out,
                         cudaStream_t stream) {
    SM4_LAUNCH(tokens, kRowThreads, 0, stream, scatter_rows_kernel<T>)(static_cast<const T*>(x), rows, k, dim, static_cast<T*>(out));
    return cudaGetLastError();
  }
};

template <typename T>
struct ZeroRows {
  static cudaError_t run(void* out, const int64_t* first_row, int64_t num_rows, int64_t dim, cudaStream_t stream) {
    const int64_t elements = num_rows * dim;
    const int blocks = static_cast<int>(std::min<int64_t>((elements + kRowThreads - 1) / kRowThreads, 4096));
    SM4_LAUNCH(blocks, kRowThreads, 0, stream, zero_rows_kernel<T>)(static_cast<T*>(out), first_row, num_rows, dim);
    return cudaGetLastError();
  }
};

template <typename T>
struct CombineRows {
  static cudaError_t run(const void* src, const float* weights, const int64_t* rows, int64_t tokens, int64_t k, int64_t dim,
                         void* out, cudaStream_t stream) {
    SM4_LAUNCH(tokens, kRowThreads, 0, stream, combine_rows_kernel<T>)(static_cast<const T*>(src), weights, rows, k, dim,
                                                               static_cast<T*>(out));
    return cudaGetLastError();
  }
};

template <typename T>
struct UnpermuteBackward {
  static cudaError_t run(const void* grad_y, const void* y_sorted, const float* gates, const int64_t* rows, int64_t tokens,
                         int64_t k, int64_t dim, void* grad_sorted, float* grad_gates, cudaStream_t stream) {
    SM4_LAUNCH(tokens, kRowThreads, 0, stream, unpermute_backward_kernel<T>)(
        static_cast<const T*>(grad_y), static_cast<const T*>(y_sorted), gates, rows, k, dim, static_cast<T*>(grad_sorted),
        grad_gates);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t launch_bin_counts(const int64_t* ids, int64_t n, int64_t num_experts, int64_t* block_counts, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n + kSortBlock - 1) / kSortBlock;
  const size_t shared = static_cast<size_t>(num_experts + 1) * sizeof(unsigned int);
  if (shared > 48 * 1024) return cudaErrorInvalidValue;
  SM4_LAUNCH(blocks, kSortBlock, shared, stream, bin_counts_kernel)(ids, n, num_experts, block_counts);
  return cudaGetLastError();
}

cudaError_t launch_metadata_scatter(const int64_t* ids, const int64_t* block_start, int64_t n, int64_t num_experts, int64_t k,
                                    int64_t* sorted_assignment, int64_t* sorted_token, int64_t* assignment_row,
                                    cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n + kSortBlock - 1) / kSortBlock;
  SM4_LAUNCH(blocks, kSortBlock, 0, stream, metadata_scatter_kernel)(ids, block_start, n, num_experts, k, sorted_assignment,
                                                             sorted_token, assignment_row);
  return cudaGetLastError();
}

cudaError_t launch_scatter_rows(const void* x, FloatType type, const int64_t* rows, int64_t tokens, int64_t k, int64_t dim,
                                void* out, cudaStream_t stream) {
  if (tokens == 0 || dim == 0) return cudaSuccess;
  return by_type<ScatterRows>(type, x, rows, tokens, k, dim, out, stream);
}

cudaError_t launch_zero_rows_from(void* out, FloatType type, const int64_t* first_row, int64_t num_rows, int64_t dim,
                                  cudaStream_t stream) {
  if (num_rows == 0 || dim == 0) return cudaSuccess;
  return by_type<ZeroRows>(type, out, first_row, num_rows, dim, stream);
}

cudaError_t launch_combine_rows(const void* src, FloatType type, const float* weights, const int64_t* rows, int64_t tokens,
                                int64_t k, int64_t dim, void* out, cudaStream_t stream) {
  if (tokens == 0 || dim == 0) return cudaSuccess;
  return by_type<CombineRows>(type, src, weights, rows, tokens, k, dim, out, stream);
}

cudaError_t launch_unpermute_backward(const void* grad_y, const void* y_sorted, FloatType type, const float* gates,
                                      const int64_t* rows, int64_t tokens, int64_t k, int64_t dim, void* grad_sorted,
                                      float* grad_gates, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  return by_type<UnpermuteBackward>(type, grad_y, y_sorted, gates, rows, tokens, k, dim, grad_sorted, grad_gates, stream);
}

}  // namespace sm4::cuda
