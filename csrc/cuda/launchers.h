// Plain C++ entry points of the CUDA kernels.
//
// The .cu files include no torch headers (nvcc compiles them in seconds instead of ~90 s, and the
// test suite can compile them for sm_80 and sm_90 on a machine with only nvcc); the torch binding
// of each op lives in a .cpp beside it and calls these launchers on the current stream.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace sm4::cuda {

// Counts assignments per expert and writes their exclusive prefix sum.
//   expert_ids: num_assignments ids (int32 if ids_are_int64 is false, else int64); -1 = none.
//   counts:  (num_experts,) int64, output.   offsets: (num_experts + 1,) int64, output.
// Ids outside [-1, num_experts) are not counted (checking them would need a host sync).
cudaError_t launch_expert_histogram(const void* expert_ids, bool ids_are_int64,
                                    int64_t num_assignments, int64_t num_experts, int64_t* counts,
                                    int64_t* offsets, cudaStream_t stream);

}  // namespace sm4::cuda

namespace sm4::cuda {

// Element type of a floating-point input (the kernels read it and compute in fp32).
enum class FloatType { kFloat32, kFloat16, kBFloat16 };

// Largest expert count of the CUDA gating kernels: each lane of a warp holds E / 32 <= 8 logits.
constexpr int64_t kGatingMaxExperts = 256;

// Number of per-block partial rows the gating forward writes (its grid size: 64 tokens a block, 32 for E > 128).
int64_t topk_gating_num_blocks(int64_t num_tokens, int64_t num_experts);

// Fused noisy top-k gating forward (contract: csrc/sm4_ops.cpp, topk_gating_forward).
//   x: (T, d) of x_type; weight: (d, E) fp32; noise: (T, E) fp32 or null; token_k: (T,) int64
//   or null. Outputs: ids (T, K) int64, gates (T, K), entropy (T,), runner_up (T,) int64, logits
//   (T, E) fp32 (the clean logits, NaN rows for non-finite tokens, for the backward), and
//   per-block partial sums block_importance / block_load (blocks, E) fp32, block_counts (blocks,
//   E) int64, which the caller sums over blocks.
cudaError_t launch_topk_gating_forward(const void* x, FloatType x_type, const float* weight,
                                       const float* noise, const int64_t* token_k, int64_t num_tokens,
                                       int64_t dim, int64_t num_experts, int64_t k, float sigma,
                                       bool renormalize, int64_t* ids, float* gates, float* entropy,
                                       int64_t* runner_up, float* logits, float* block_importance, float* block_load,
                                       int64_t* block_counts, cudaStream_t stream);

// Its backward up to the logits: d_logits (T, E) fp32 from d_gates (T, K), d_importance (E,) and
// d_load (E,) (all fp32) and the forward's saved logits.
cudaError_t launch_topk_gating_backward(const float* logits, const float* noise, const int64_t* ids,
                                        const int64_t* runner_up,
                                        const float* d_gates, const float* d_importance, const float* d_load,
                                        int64_t num_tokens, int64_t num_experts, int64_t k, float sigma,
                                        bool renormalize, float* d_logits, cudaStream_t stream);

}  // namespace sm4::cuda

namespace sm4::cuda {

// ---- token permutation (permutation.cu) ----
// Assignments per block of the metadata counting sort.
constexpr int64_t kSortBlock = 256;

// Pass 1 of the metadata sort: block_counts (blocks, E + 1) int64, the count of each bin in each
// block of kSortBlock assignments (bin E: inactive, id < 0).
cudaError_t launch_bin_counts(const int64_t* ids, int64_t num_assignments, int64_t num_experts,
                              int64_t* block_counts, cudaStream_t stream);
// Pass 2: given block_start (blocks, E + 1), the first row of each (block, bin), writes
// sorted_assignment and sorted_token (N,) and assignment_row (N,) (-1 for inactive); stable.
cudaError_t launch_metadata_scatter(const int64_t* ids, const int64_t* block_start, int64_t num_assignments,
                                    int64_t num_experts, int64_t k, int64_t* sorted_assignment,
                                    int64_t* sorted_token, int64_t* assignment_row, cudaStream_t stream);
// The row kernels mask rows outside [0, num_rows) (see permutation.cu): no access outside the tensors.
// out[assignment_row[t, r]] = x[t] for rows in [0, num_out_rows). x, out: (T, d) / (num_out_rows, d) of `type`.
cudaError_t launch_scatter_rows(const void* x, FloatType type, const int64_t* assignment_row, int64_t num_tokens,
                                int64_t k, int64_t num_out_rows, int64_t dim, void* out, cudaStream_t stream);
// Zeroes rows [clamp(*first_padding_row, 0, num_rows), num_rows) of out (num_rows, d); the row index is
// read on the device.
cudaError_t launch_zero_rows_from(void* out, FloatType type, const int64_t* first_padding_row, int64_t num_rows,
                                  int64_t dim, cudaStream_t stream);
// out[t] = sum over r with a row in [0, num_src_rows) of (weights[t, r] or 1 if null) * src[assignment_row[t, r]],
// in fp32. src: (num_src_rows, d).
cudaError_t launch_combine_rows(const void* src, FloatType type, const float* weights, const int64_t* assignment_row,
                                int64_t num_tokens, int64_t k, int64_t num_src_rows, int64_t dim, void* out,
                                cudaStream_t stream);
// grad_sorted[row(t, r)] = gates[t, r] * grad_y[t]; grad_gates[t, r] = grad_y[t] . y_sorted[row(t, r)]
// (0 for inactive ranks and rows outside [0, num_rows)). y_sorted, grad_sorted: (num_rows, d). Padding rows
// of grad_sorted are left to launch_zero_rows_from.
cudaError_t launch_unpermute_backward(const void* grad_y, const void* y_sorted, FloatType type, const float* gates,
                                      const int64_t* assignment_row, int64_t num_tokens, int64_t k, int64_t num_rows,
                                      int64_t dim, void* grad_sorted, float* grad_gates, cudaStream_t stream);

}  // namespace sm4::cuda

namespace sm4::cuda {

// ---- grouped GEMM (grouped_gemm.cu) ----
// Contracts: csrc/sm4_ops.cpp (grouped_mm, grouped_weight_grad). All tensors contiguous, on the
// device of the stream; the expert offsets are only read on the device (no host sync).

// int64 elements of the scratch buffer launch_grouped_mm needs (the per-expert tile schedule).
int64_t grouped_mm_workspace_elements(int64_t num_experts);

struct GroupedMmArgs {
  const void* a = nullptr;                 // (a_rows, K) of `type`
  const void* weight = nullptr;            // (E, K, N), or (E, N, K) when transpose_weight; `type`
  const void* bias = nullptr;              // (E, N) of `type`, or null
  const int64_t* expert_offsets = nullptr; // (E + 1,)
  const int64_t* gather_index = nullptr;   // (M,): row of a read for sorted row i; null: row i
  const int64_t* scatter_index = nullptr;  // (M,): row of out written by sorted row i; null: row i
  const float* scatter_scale = nullptr;    // (M,) fp32, or null (scale 1)
  void* out = nullptr;                     // (num_out_rows, N) of `type`; need not be initialised
  void* preact = nullptr;                  // (M, N) of `type`, or null (not saved)
  int64_t* workspace = nullptr;            // grouped_mm_workspace_elements(E) int64
  FloatType type = FloatType::kFloat32;
  int64_t a_rows = 0, M = 0, K = 0, N = 0, E = 0, num_out_rows = 0;
  bool transpose_weight = false;
  int activation = 0;                      // 0 none, 1 GELU (erf), 2 GELU (tanh)
};
// Writes every element of out (zeros where no active row lands) and of preact when given.
cudaError_t launch_grouped_mm(const GroupedMmArgs& args, cudaStream_t stream);

struct GroupedWeightGradArgs {
  const void* a = nullptr;                 // (a_rows, K) of `type`
  const void* grad = nullptr;              // (grad_rows, N) of `type`
  const int64_t* expert_offsets = nullptr; // (E + 1,)
  const int64_t* a_index = nullptr;        // (M,) or null (row i)
  const int64_t* grad_index = nullptr;     // (M,) or null (row i)
  void* grad_weight = nullptr;             // (E, K, N) of `type`; need not be initialised
  void* grad_bias = nullptr;               // (E, N) of `type`, or null (not computed)
  FloatType type = FloatType::kFloat32;
  int64_t a_rows = 0, grad_rows = 0, M = 0, K = 0, N = 0, E = 0;
};
// Writes every element of grad_weight and grad_bias (fixed summation order: deterministic).
cudaError_t launch_grouped_weight_grad(const GroupedWeightGradArgs& args, cudaStream_t stream);

}  // namespace sm4::cuda
