// CUDA kernels of token permutation (no torch headers: see launchers.h).
//
// Metadata: a stable counting sort over E + 1 bins. Pass 1 counts each block's bins in shared
// memory (integer atomics: exact); the binding turns the counts into block start rows with int64
// cumsums; pass 2 places each assignment at start + its rank among the earlier assignments of its
// block and bin (counted, not atomically claimed: stable and deterministic).
// Rows: a group of lanes per token (sized to the row: a warp or fewer, several tokens per block)
// walks its ranks in order, in 16-byte vectors when the rows and base pointers allow (chosen on the
// host from d * element size and the pointers: no device sync), element by element otherwise;
// nothing is scatter-added.
//
// Bad metadata on the device (a check would be a host sync; CPU tensors are checked in Python):
// the kernels mask, as the CUDA grouped GEMM does, and never access memory outside their tensors.
//   permute: an assignment_row outside [0, N) is dropped (-1 is the inactive mark; anything else
//     is not written either); the padding start offsets[E] is clamped to [0, N], and the padding is
//     zeroed before the rows are written, so bad offsets cannot erase a written row.
//   unpermute / permute_backward: a row outside [0, N) reads as zeros (adds nothing).
//   unpermute_backward: such a row is neither read nor written and its gate gradient is 0; the
//     padding (zeroed first) starts at the count of in-range rows.
// Output rows that no in-range assignment reaches are unspecified only where the metadata is
// inconsistent (duplicate or missing rows); no access is ever outside the tensors.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <utility>

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

// ---- row kernels: a group of `lanes` consecutive threads per token -------------------------------
// A row of d elements is `chunks` chunks: 16-byte vectors (VEC = 16 / sizeof(T) elements) when every
// row and base pointer is 16-byte aligned (decided on the host), single elements otherwise. A group
// is the smallest power of two of lanes >= chunks, at most a warp, so a d = 64 bf16 row (8 chunks)
// takes 8 lanes with one 16-byte access each and a block of 256 threads moves 32 rows; groups
// never straddle a warp, which lets unpermute_backward reduce within a group by shuffles.
struct RowLayout {
  int chunks;      // chunks per row (d / VEC)
  int lane_shift;  // log2(lanes per row), 0..5
};

constexpr unsigned kFullMask = 0xffffffffu;

// This thread's place in the layout: its lane in its token's group, the group's size, and the token
// (groups are consecutive threads: block b holds tokens b * (kRowThreads / lanes) onwards).
struct RowLane {
  int lane, lanes;
  int64_t token;
};

__device__ __forceinline__ RowLane row_lane(const RowLayout& layout) {
  const int lane = threadIdx.x & ((1 << layout.lane_shift) - 1);
  const int64_t token = int64_t(blockIdx.x) * (kRowThreads >> layout.lane_shift) + (threadIdx.x >> layout.lane_shift);
  return RowLane{lane, 1 << layout.lane_shift, token};
}

// VEC elements of T moved as one access (16 bytes for the vector path).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}
template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& value) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = value;
}

__device__ __forceinline__ bool row_in_range(int64_t row, int64_t num_rows) { return row >= 0 && row < num_rows; }

// out[row(t, r)] = x[t] for rows in [0, num_out_rows); any other row (-1: inactive; anything else:
// bad metadata) is dropped. A pure copy, so Chunk is a raw 16-byte vector or the element type.
template <typename Chunk>
__global__ void __launch_bounds__(kRowThreads) scatter_rows_kernel(const Chunk* __restrict__ x,
                                                                   const int64_t* __restrict__ rows, int64_t tokens,
                                                                   int64_t k, int64_t num_out_rows, RowLayout layout,
                                                                   Chunk* __restrict__ out) {
  const auto [lane, lanes, t] = row_lane(layout);
  if (t >= tokens) return;
  const Chunk* __restrict__ src = x + t * layout.chunks;
  for (int64_t r = 0; r < k; ++r) {
    const int64_t row = rows[t * k + r];
    if (!row_in_range(row, num_out_rows)) continue;
    Chunk* __restrict__ dst = out + row * layout.chunks;
#pragma unroll 4
    for (int c = lane; c < layout.chunks; c += lanes) dst[c] = src[c];
  }
}

// Zeroes rows [clamp(*first_row, 0, num_rows), num_rows): a first row read from bad offsets can
// neither start the writes before the tensor nor end them after it.
template <typename Chunk>
__global__ void zero_rows_kernel(Chunk* __restrict__ out, const int64_t* __restrict__ first_row, int64_t num_rows,
                                 int64_t row_chunks) {
  const int64_t first = min(max(*first_row, int64_t{0}), num_rows);
  const int64_t start = first * row_chunks, end = num_rows * row_chunks;
  for (int64_t i = start + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < end; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = Chunk{};
}

// out[t] = sum over r of (weights[t, r] or 1) * src[row(t, r)], in fp32 and rank order; rows
// outside [0, num_src_rows) add nothing (read as zeros).
template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads) combine_rows_kernel(const T* __restrict__ src,
                                                                   const float* __restrict__ weights,
                                                                   const int64_t* __restrict__ rows, int64_t tokens,
                                                                   int64_t k, int64_t num_src_rows, RowLayout layout,
                                                                   T* __restrict__ out) {
  const auto [lane, lanes, t] = row_lane(layout);
  if (t >= tokens) return;
  for (int c = lane; c < layout.chunks; c += lanes) {
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
    for (int64_t r = 0; r < k; ++r) {
      const int64_t row = rows[t * k + r];
      if (!row_in_range(row, num_src_rows)) continue;  // inactive (or bad): adds exactly nothing
      const float w = weights ? weights[t * k + r] : 1.f;
      const Pack<T, VEC> v = load_pack<T, VEC>(src + (row * layout.chunks + c) * VEC);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += w * to_float(v.v[i]);
    }
    Pack<T, VEC> o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = from_float<T>(acc[i]);
    store_pack<T, VEC>(out + (t * layout.chunks + c) * VEC, o);
  }
}

// grad_sorted[row(t, r)] = gates[t, r] * grad_y[t]; grad_gates[t, r] = grad_y[t] . y_sorted[row]
// (0 for a row outside [0, num_rows), which is neither read nor written). The dot product: each
// lane sums its chunks in order, then a xor butterfly within the group (fixed order: deterministic).
template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads) unpermute_backward_kernel(
    const T* __restrict__ grad_y, const T* __restrict__ y_sorted, const float* __restrict__ gates,
    const int64_t* __restrict__ rows, int64_t tokens, int64_t k, int64_t num_rows, RowLayout layout,
    T* __restrict__ grad_sorted, float* __restrict__ grad_gates) {
  const auto [lane, lanes, t] = row_lane(layout);
  const bool in_batch = t < tokens;  // no early exit: the groups of a warp shuffle together
  for (int64_t r = 0; r < k; ++r) {
    const int64_t row = in_batch ? rows[t * k + r] : -1;
    const bool active = row_in_range(row, num_rows);
    float dot = 0.f;
    if (active) {
      const float gate = gates[t * k + r];
      for (int c = lane; c < layout.chunks; c += lanes) {
        const Pack<T, VEC> g = load_pack<T, VEC>(grad_y + (t * layout.chunks + c) * VEC);
        const Pack<T, VEC> y = load_pack<T, VEC>(y_sorted + (row * layout.chunks + c) * VEC);
        Pack<T, VEC> o;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float gv = to_float(g.v[i]);
          o.v[i] = from_float<T>(gate * gv);
          dot += gv * to_float(y.v[i]);
        }
        store_pack<T, VEC>(grad_sorted + (row * layout.chunks + c) * VEC, o);
      }
    }
    for (int offset = lanes / 2; offset > 0; offset >>= 1) dot += __shfl_xor_sync(kFullMask, dot, offset);
    if (in_batch && lane == 0) grad_gates[t * k + r] = active ? dot : 0.f;
  }
}

// ---- host side: layout and path selection ---------------------------------------------------------
constexpr int64_t kVectorBytes = 16;

// Whether rows of `row_bytes` at these base pointers can move as 16-byte vectors.
bool vectorizable(int64_t row_bytes, std::initializer_list<const void*> pointers) {
  if (row_bytes % kVectorBytes != 0) return false;
  for (const void* p : pointers)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % kVectorBytes != 0) return false;
  return true;
}

RowLayout row_layout(int64_t chunks) {
  int shift = 0;
  while (shift < 5 && (int64_t{1} << shift) < chunks) ++shift;
  return RowLayout{static_cast<int>(chunks), shift};
}

int64_t row_blocks(int64_t tokens, const RowLayout& layout) {
  const int64_t rows_per_block = kRowThreads >> layout.lane_shift;
  return (tokens + rows_per_block - 1) / rows_per_block;
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
  static cudaError_t run(const void* x, const int64_t* rows, int64_t tokens, int64_t k, int64_t num_out_rows, int64_t dim,
                         void* out, cudaStream_t stream) {
    if (vectorizable(dim * int64_t(sizeof(T)), {x, out})) {
      const RowLayout layout = row_layout(dim * int64_t(sizeof(T)) / kVectorBytes);
      SM4_LAUNCH(row_blocks(tokens, layout), kRowThreads, 0, stream, scatter_rows_kernel<uint4>)(
          static_cast<const uint4*>(x), rows, tokens, k, num_out_rows, layout, static_cast<uint4*>(out));
    } else {
      const RowLayout layout = row_layout(dim);
      SM4_LAUNCH(row_blocks(tokens, layout), kRowThreads, 0, stream, scatter_rows_kernel<T>)(
          static_cast<const T*>(x), rows, tokens, k, num_out_rows, layout, static_cast<T*>(out));
    }
    return cudaGetLastError();
  }
};

template <typename Chunk>
cudaError_t zero_rows(Chunk* out, const int64_t* first_row, int64_t num_rows, int64_t row_chunks, cudaStream_t stream) {
  const int64_t chunks = num_rows * row_chunks;
  const int blocks = static_cast<int>(std::min<int64_t>((chunks + kRowThreads - 1) / kRowThreads, 4096));
  SM4_LAUNCH(blocks, kRowThreads, 0, stream, zero_rows_kernel<Chunk>)(out, first_row, num_rows, row_chunks);
  return cudaGetLastError();
}

template <typename T>
struct ZeroRows {
  static cudaError_t run(void* out, const int64_t* first_row, int64_t num_rows, int64_t dim, cudaStream_t stream) {
    if (vectorizable(dim * int64_t(sizeof(T)), {out}))
      return zero_rows(static_cast<uint4*>(out), first_row, num_rows, dim * int64_t(sizeof(T)) / kVectorBytes, stream);
    return zero_rows(static_cast<T*>(out), first_row, num_rows, dim, stream);
  }
};

template <typename T>
struct CombineRows {
  static cudaError_t run(const void* src, const float* weights, const int64_t* rows, int64_t tokens, int64_t k,
                         int64_t num_src_rows, int64_t dim, void* out, cudaStream_t stream) {
    constexpr int kVec = kVectorBytes / sizeof(T);
    const T* s = static_cast<const T*>(src);
    T* o = static_cast<T*>(out);
    if (vectorizable(dim * int64_t(sizeof(T)), {src, out})) {
      const RowLayout layout = row_layout(dim / kVec);
      SM4_LAUNCH(row_blocks(tokens, layout), kRowThreads, 0, stream, combine_rows_kernel<T, kVec>)(
          s, weights, rows, tokens, k, num_src_rows, layout, o);
    } else {
      const RowLayout layout = row_layout(dim);
      SM4_LAUNCH(row_blocks(tokens, layout), kRowThreads, 0, stream, combine_rows_kernel<T, 1>)(
          s, weights, rows, tokens, k, num_src_rows, layout, o);
    }
    return cudaGetLastError();
  }
};

template <typename T>
struct UnpermuteBackward {
  static cudaError_t run(const void* grad_y, const void* y_sorted, const float* gates, const int64_t* rows, int64_t tokens,
                         int64_t k, int64_t num_rows, int64_t dim, void* grad_sorted, float* grad_gates,
                         cudaStream_t stream) {
    constexpr int kVec = kVectorBytes / sizeof(T);
    const T* gy = static_cast<const T*>(grad_y);
    const T* y = static_cast<const T*>(y_sorted);
    T* gs = static_cast<T*>(grad_sorted);
    if (vectorizable(dim * int64_t(sizeof(T)), {grad_y, y_sorted, grad_sorted})) {
      const RowLayout layout = row_layout(dim / kVec);
      SM4_LAUNCH(row_blocks(tokens, layout), kRowThreads, 0, stream, unpermute_backward_kernel<T, kVec>)(
          gy, y, gates, rows, tokens, k, num_rows, layout, gs, grad_gates);
    } else {
      const RowLayout layout = row_layout(dim);
      SM4_LAUNCH(row_blocks(tokens, layout), kRowThreads, 0, stream, unpermute_backward_kernel<T, 1>)(
          gy, y, gates, rows, tokens, k, num_rows, layout, gs, grad_gates);
    }
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

cudaError_t launch_scatter_rows(const void* x, FloatType type, const int64_t* rows, int64_t tokens, int64_t k,
                                int64_t num_out_rows, int64_t dim, void* out, cudaStream_t stream) {
  if (tokens == 0 || dim == 0) return cudaSuccess;
  return by_type<ScatterRows>(type, x, rows, tokens, k, num_out_rows, dim, out, stream);
}

cudaError_t launch_zero_rows_from(void* out, FloatType type, const int64_t* first_row, int64_t num_rows, int64_t dim,
                                  cudaStream_t stream) {
  if (num_rows == 0 || dim == 0) return cudaSuccess;
  return by_type<ZeroRows>(type, out, first_row, num_rows, dim, stream);
}

cudaError_t launch_combine_rows(const void* src, FloatType type, const float* weights, const int64_t* rows, int64_t tokens,
                                int64_t k, int64_t num_src_rows, int64_t dim, void* out, cudaStream_t stream) {
  if (tokens == 0 || dim == 0) return cudaSuccess;
  return by_type<CombineRows>(type, src, weights, rows, tokens, k, num_src_rows, dim, out, stream);
}

cudaError_t launch_unpermute_backward(const void* grad_y, const void* y_sorted, FloatType type, const float* gates,
                                      const int64_t* rows, int64_t tokens, int64_t k, int64_t num_rows, int64_t dim,
                                      void* grad_sorted, float* grad_gates, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  return by_type<UnpermuteBackward>(type, grad_y, y_sorted, gates, rows, tokens, k, num_rows, dim, grad_sorted, grad_gates,
                                    stream);
}

}  // namespace sm4::cuda
