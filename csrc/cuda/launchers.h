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

// Number of per-block partial rows the gating forward writes (its grid size).
int64_t topk_gating_num_blocks(int64_t num_tokens);

// Fused noisy top-k gating forward (contract: csrc/sm4_ops.cpp, topk_gating_forward).
//   x: (T, d) of x_type; weight: (d, E) fp32; noise: (T, E) fp32 or null; token_k: (T,) int64
//   or null. Outputs: ids (T, K) int64, gates (T, K), entropy (T,), runner_up (T,) int64, and
//   per-block partial sums block_importance / block_load (blocks, E) fp32, block_counts (blocks,
//   E) int64, which the caller sums over blocks.
cudaError_t launch_topk_gating_forward(const void* x, FloatType x_type, const float* weight,
                                       const float* noise, const int64_t* token_k, int64_t num_tokens,
                                       int64_t dim, int64_t num_experts, int64_t k, float sigma,
                                       bool renormalize, int64_t* ids, float* gates, float* entropy,
                                       int64_t* runner_up, float* block_importance, float* block_load,
                                       int64_t* block_counts, cudaStream_t stream);

// Its backward up to the logits: d_logits (T, E) fp32 from d_gates (T, K), d_importance (E,) and
// d_load (E,) (all fp32), recomputing the logits from x and weight.
cudaError_t launch_topk_gating_backward(const void* x, FloatType x_type, const float* weight,
                                        const float* noise, const int64_t* ids, const int64_t* runner_up,
                                        const float* d_gates, const float* d_importance, const float* d_load,
                                        int64_t num_tokens, int64_t dim, int64_t num_experts, int64_t k,
                                        float sigma, bool renormalize, float* d_logits, cudaStream_t stream);

}  // namespace sm4::cuda
