// CUDA kernels of fused noisy top-k gating (SM4_SPEC §2; sm4/reference.py is the truth).
//
// One warp routes one token, eight warps per block. The block computes its eight tokens' logits
// together: tiles of kTileD features of x (8 x kTileD) and of the router weight (kTileD x E) go
// through shared memory, and lane l of a warp accumulates experts l, l + 32, ... (E <= 256, so at
// most 8 per lane) in fp32 registers; the (T, E) logits never touch global memory. The rest is
// warp-level: shuffles for max / sum, k_max + 1 rounds of a warp argmax whose comparison is
// (value descending, index ascending), so ties go to the lower index. Per-block partial sums of
// importance, load and counts are added in a fixed warp order and written per block; the caller
// sums the blocks (no float atomics: deterministic). The clean logits are written once for the
// backward, which is then a per-token pass with no GEMM and no second read of x.
//
// No torch headers here (see launchers.h).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <climits>
#include <cstdint>

#include "emulation_seams.cuh"
#include "launchers.h"

namespace sm4::cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kTokensPerBlock = 8;
constexpr int kThreads = kTokensPerBlock * kWarpSize;
constexpr int kTileD = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float load_float(const float* p) { return *p; }
__device__ __forceinline__ float load_float(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_float(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// Butterfly sum: every lane ends with the same value, added in the same order on every run.
__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ bool ranks_before(float value, int index, float other_value, int other_index) {
  return value > other_value || (value == other_value && index < other_index);
}

// The expert with the largest value over the warp, ties to the lower index; same on every lane.
__device__ __forceinline__ void warp_best(float& value, int& index) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const float other_value = __shfl_xor_sync(kFullMask, value, offset);
    const int other_index = __shfl_xor_sync(kFullMask, index, offset);
    if (ranks_before(other_value, other_index, value, index)) {
      value = other_value;
      index = other_index;
    }
  }
}

// values[j] of the lane that owns expert e (lane e % 32, slot e / 32), broadcast to the warp.
template <int EPT>
__device__ __forceinline__ float owner_value(const float (&values)[EPT], int expert) {
  float mine = 0.f;
#pragma unroll
  for (int j = 0; j < EPT; ++j)
    if (j == expert / kWarpSize) mine = values[j];
  return __shfl_sync(kFullMask, mine, expert % kWarpSize);
}

// Softmax over the warp's experts (lane slot j = expert lane + 32 j; padded slots hold -inf):
// probabilities into out, and the max and partition function, identical on every lane.
template <int EPT>
__device__ __forceinline__ void warp_softmax(const float (&logits)[EPT], float (&out)[EPT], float& max_value,
                                             float& partition) {
  float local_max = -INFINITY;
#pragma unroll
  for (int j = 0; j < EPT; ++j) local_max = fmaxf(local_max, logits[j]);
  max_value = warp_max(local_max);
  float local_sum = 0.f;
#pragma unroll
  for (int j = 0; j < EPT; ++j) {
    out[j] = __expf(logits[j] - max_value);
    local_sum += out[j];
  }
  partition = warp_sum(local_sum);
#pragma unroll
  for (int j = 0; j < EPT; ++j) out[j] /= partition;
}

__device__ __forceinline__ float normal_cdf(float z) { return 0.5f * erfcf(-z * 0.70710678118654752f); }
__device__ __forceinline__ float normal_pdf(float z) { return 0.39894228040143268f * __expf(-0.5f * z * z); }

// Logits of this warp's token: lane slot j holds expert lane + 32 j. Also returns whether the
// token's input and logits are all finite (non-finite input elements are read as 0).
template <typename x_t, int EPT>
__device__ void token_logits(const x_t* __restrict__ x, const float* __restrict__ weight, int64_t num_tokens,
                             int64_t dim, int64_t num_experts, int64_t token, float* x_tile, float* w_tile,
                             int* bad_input, float (&logits)[EPT], bool& finite) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int j = 0; j < EPT; ++j) logits[j] = 0.f;
  if (lane == 0) bad_input[warp] = 0;
  __syncthreads();
  for (int64_t d0 = 0; d0 < dim; d0 += kTileD) {
    // x tile: warp w loads its token's kTileD features, one per lane (coalesced).
    float v = 0.f;
    const int64_t col = d0 + lane;
    if (token < num_tokens && col < dim) {
      v = load_float(x + token * dim + col);
      if (!isfinite(v)) {
        bad_input[warp] = 1;
        v = 0.f;
      }
    }
    x_tile[warp * kTileD + lane] = v;
    for (int64_t i = threadIdx.x; i < kTileD * num_experts; i += kThreads) {
      const int64_t row = d0 + i / num_experts;
      w_tile[i] = row < dim ? weight[row * num_experts + i % num_experts] : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int r = 0; r < kTileD; ++r) {
      const float xv = x_tile[warp * kTileD + r];
#pragma unroll
      for (int j = 0; j < EPT; ++j) {
        const int e = lane + j * kWarpSize;
        if (e < num_experts) logits[j] = fmaf(xv, w_tile[r * num_experts + e], logits[j]);
      }
    }
    __syncthreads();
  }
  bool ok = bad_input[warp] == 0;
#pragma unroll
  for (int j = 0; j < EPT; ++j)
    if (lane + j * kWarpSize < num_experts && !isfinite(logits[j])) ok = false;
  finite = __all_sync(kFullMask, ok);
}

struct GatingArgs {
  const float* weight;
  const float* noise;
  const int64_t* token_k;
  int64_t num_tokens, dim, num_experts, k;
  float sigma;
  bool renormalize;
};

template <typename x_t, int EPT>
__global__ void __launch_bounds__(kThreads, 2) gating_forward_kernel(
    const x_t* __restrict__ x, GatingArgs a, int64_t* __restrict__ ids, float* __restrict__ gates,
    float* __restrict__ entropy, int64_t* __restrict__ runner_up, float* __restrict__ logits,
    float* __restrict__ block_importance,
    float* __restrict__ block_load, int64_t* __restrict__ block_counts) {
  SM4_DYNAMIC_SHARED(float, shared);
  float* w_tile = shared;                                  // kTileD * E (reused for partial sums)
  float* x_tile = w_tile + kTileD * a.num_experts;          // kTokensPerBlock * kTileD
  int* bad_input = reinterpret_cast<int*>(x_tile + kTokensPerBlock * kTileD);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t E = a.num_experts, K = a.k;
  const int64_t token = blockIdx.x * int64_t(kTokensPerBlock) + warp;
  const bool in_batch = token < a.num_tokens;

  float clean[EPT];
  bool finite;
  token_logits<x_t, EPT>(x, a.weight, a.num_tokens, a.dim, E, token, x_tile, w_tile, bad_input, clean, finite);
  if (a.sigma > 0.f && in_batch) {  // a non-finite noise row makes the token non-finite too (as in the reference)
    bool noise_ok = true;
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
      const int e = lane + j * kWarpSize;
      if (e < E && !isfinite(a.noise[token * E + e])) noise_ok = false;
    }
    finite = __all_sync(kFullMask, noise_ok) && finite;  // in_batch is the same on every lane of the warp
  }
  // From here w_tile is free: it holds this block's per-token contributions.
  float* importance_part = w_tile;                         // kTokensPerBlock * E
  float* load_part = importance_part + kTokensPerBlock * E;
  float* count_part = load_part + kTokensPerBlock * E;

  const bool has_noise = a.sigma > 0.f;
  int64_t kt = K;
  if (a.token_k != nullptr && in_batch) kt = min(max(a.token_k[token], int64_t{1}), K);
  if (in_batch) {
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
      const int e = lane + j * kWarpSize;
      if (e < E) logits[token * E + e] = finite ? clean[j] : NAN;  // saved for the backward
    }
  }
  float noisy[EPT], probs[EPT], q[EPT];
  // The smooth load is computed once the selection (the last use of the noisy logits) is done:
  // it reuses their registers (EPT = 8 would spill otherwise).
  float (&load)[EPT] = noisy;
  unsigned selected = 0, removed = 0;
#pragma unroll
  for (int j = 0; j < EPT; ++j) {
    const int e = lane + j * kWarpSize;
    const bool valid = e < E;
    if (!finite) clean[j] = 0.f;
    const float eps = (has_noise && valid && in_batch) ? a.noise[token * E + e] : 0.f;
    noisy[j] = valid ? clean[j] + a.sigma * eps : -INFINITY;
    clean[j] = valid ? clean[j] : -INFINITY;
  }

  if (in_batch && !finite) {
    // Routed as if all logits were equal (lowest experts); NaN gates and entropy; not counted
    // in importance or load.
    for (int64_t r = lane; r < K; r += kWarpSize) {
      ids[token * K + r] = r < kt ? r : -1;
      gates[token * K + r] = r < kt ? NAN : 0.f;
    }
    if (lane == 0) {
      entropy[token] = NAN;
      runner_up[token] = -1;
    }
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
      if (lane + j * kWarpSize < kt) selected |= 1u << j;
      q[j] = 0.f;
      load[j] = 0.f;
    }
  } else if (in_batch) {
    float noisy_max, noisy_partition;
    warp_softmax(noisy, probs, noisy_max, noisy_partition);

    // Rounds of warp argmax: ranks 0..kt-1 are the selection, rank kt the runner-up.
    const int64_t ranked = min(K + 1, E);
    float active_sum = 0.f, threshold_selected = -INFINITY, threshold_unselected = 0.f;
    int64_t runner = -1;
    for (int64_t r = 0; r < ranked; ++r) {
      float best_value = -INFINITY;
      int best_index = INT_MAX;
#pragma unroll
      for (int j = 0; j < EPT; ++j) {
        const int e = lane + j * kWarpSize;
        if (e < E && !(removed >> j & 1u) && ranks_before(noisy[j], e, best_value, best_index)) {
          best_value = noisy[j];
          best_index = e;
        }
      }
      warp_best(best_value, best_index);
      const bool owner = lane == best_index % kWarpSize;
      if (owner) removed |= 1u << (best_index / kWarpSize);
      if (r < kt) {
        if (owner) selected |= 1u << (best_index / kWarpSize);
        const float gate = owner_value(probs, best_index);
        active_sum += gate;
        if (lane == 0) {
          ids[token * K + r] = best_index;
          gates[token * K + r] = gate;
        }
      }
      if (r == kt - 1) threshold_unselected = best_value;
      if (r == kt) {
        runner = best_index;
        threshold_selected = best_value;
      }
    }
    for (int64_t r = kt + lane; r < K; r += kWarpSize) {
      ids[token * K + r] = -1;
      gates[token * K + r] = 0.f;
    }
    __syncwarp();
    if (a.renormalize)
      for (int64_t r = lane; r < kt; r += kWarpSize) gates[token * K + r] /= active_sum;
    if (lane == 0) runner_up[token] = runner;

    // Clean softmax: importance and entropy (H = log Z - sum q (l - max), no per-expert log).
    float clean_max = noisy_max, clean_partition = noisy_partition;
    if (has_noise) {
      warp_softmax(clean, q, clean_max, clean_partition);
    } else {
#pragma unroll
      for (int j = 0; j < EPT; ++j) q[j] = probs[j];
    }
    float spread = 0.f;
#pragma unroll
    for (int j = 0; j < EPT; ++j)
      if (lane + j * kWarpSize < E) spread += q[j] * (clean[j] - clean_max);
    const float token_entropy = __logf(clean_partition) - warp_sum(spread);
    if (lane == 0) entropy[token] = token_entropy;
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
      const bool is_selected = selected >> j & 1u;
      if (has_noise) {
        const float threshold = is_selected ? threshold_selected : threshold_unselected;
        load[j] = normal_cdf((clean[j] - threshold) / a.sigma);
      } else {
        load[j] = is_selected ? 1.f : 0.f;
      }
    }
  }

  // Per-token contributions -> shared, then summed over the block's tokens in warp order.
#pragma unroll
  for (int j = 0; j < EPT; ++j) {
    const int e = lane + j * kWarpSize;
    if (e < E) {
      const bool counted = in_batch && finite;
      importance_part[warp * E + e] = counted ? q[j] : 0.f;
      load_part[warp * E + e] = counted ? load[j] : 0.f;
      count_part[warp * E + e] = (in_batch && (selected >> j & 1u)) ? 1.f : 0.f;
    }
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += kThreads) {
    float importance_sum = 0.f, load_sum = 0.f;
    int64_t count = 0;
    for (int w = 0; w < kTokensPerBlock; ++w) {
      importance_sum += importance_part[w * E + e];
      load_sum += load_part[w * E + e];
      count += static_cast<int64_t>(count_part[w * E + e]);
    }
    block_importance[blockIdx.x * E + e] = importance_sum;
    block_load[blockIdx.x * E + e] = load_sum;
    block_counts[blockIdx.x * E + e] = count;
  }
}

template <int EPT>
__global__ void __launch_bounds__(kThreads, 2) gating_backward_kernel(
    const float* __restrict__ saved_logits, GatingArgs a, const int64_t* __restrict__ ids,
    const int64_t* __restrict__ runner_up, const float* __restrict__ d_gates, const float* __restrict__ d_importance,
    const float* __restrict__ d_load, float* __restrict__ d_logits) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t E = a.num_experts, K = a.k;
  const int64_t token = blockIdx.x * int64_t(kTokensPerBlock) + warp;
  if (token >= a.num_tokens) return;
  float clean[EPT];
  bool ok = true;
#pragma unroll
  for (int j = 0; j < EPT; ++j) {
    const int e = lane + j * kWarpSize;
    clean[j] = e < E ? saved_logits[token * E + e] : 0.f;
    if (e < E && !isfinite(clean[j])) ok = false;
  }
  if (!__all_sync(kFullMask, ok)) {  // a non-finite token (a NaN row) gets no gradient
    for (int64_t e = lane; e < E; e += kWarpSize) d_logits[token * E + e] = 0.f;
    return;
  }
  const bool has_noise = a.sigma > 0.f;
  float noisy[EPT], probs[EPT], d_probs[EPT], grad[EPT];
#pragma unroll
  for (int j = 0; j < EPT; ++j) {
    const int e = lane + j * kWarpSize;
    const bool valid = e < E;
    noisy[j] = valid ? clean[j] + (has_noise ? a.sigma * a.noise[token * E + e] : 0.f) : -INFINITY;
    clean[j] = valid ? clean[j] : -INFINITY;
    d_probs[j] = 0.f;
  }
  float unused_max, unused_partition;
  warp_softmax(noisy, probs, unused_max, unused_partition);

  // Gates -> probabilities. The active ranks come first; -1 marks the inactive ones.
  unsigned selected = 0;
  float active_sum = 0.f, weighted = 0.f;
  int64_t last_selected = -1;
  for (int64_t r = 0; r < K; ++r) {
    const int64_t expert = ids[token * K + r];
    if (expert < 0) break;
    const float d_gate = d_gates[token * K + r];
    const float p = owner_value(probs, static_cast<int>(expert));
    active_sum += p;
    weighted += d_gate * p;
    if (lane == expert % kWarpSize) {
#pragma unroll
      for (int j = 0; j < EPT; ++j)
        if (j == expert / kWarpSize) {
          d_probs[j] += d_gate;
          selected |= 1u << j;
        }
    }
    last_selected = expert;
  }
  if (a.renormalize) {
    const float correction = weighted / active_sum;
#pragma unroll
    for (int j = 0; j < EPT; ++j) d_probs[j] = (selected >> j & 1u) ? (d_probs[j] - correction) / active_sum : 0.f;
  }
  float dot = 0.f;
#pragma unroll
  for (int j = 0; j < EPT; ++j)
    if (lane + j * kWarpSize < E) dot += probs[j] * d_probs[j];
  dot = warp_sum(dot);
#pragma unroll
  for (int j = 0; j < EPT; ++j) grad[j] = probs[j] * (d_probs[j] - dot);

  // Importance: the clean softmax.
  float q[EPT];
  if (has_noise) {
    warp_softmax(clean, q, unused_max, unused_partition);
  } else {
#pragma unroll
    for (int j = 0; j < EPT; ++j) q[j] = probs[j];
  }
  float q_dot = 0.f;
#pragma unroll
  for (int j = 0; j < EPT; ++j) {
    const int e = lane + j * kWarpSize;
    if (e < E) q_dot += q[j] * d_importance[e];
  }
  q_dot = warp_sum(q_dot);
#pragma unroll
  for (int j = 0; j < EPT; ++j) {
    const int e = lane + j * kWarpSize;
    if (e < E) grad[j] += q[j] * (d_importance[e] - q_dot);
  }

  // Smooth load: Phi((l_e - n_j) / sigma), j = runner-up for selected e, last selected otherwise.
  if (has_noise) {
    const int64_t runner = runner_up[token];
    const float runner_value = runner >= 0 ? owner_value(noisy, static_cast<int>(runner)) : 0.f;
    const float last_value = owner_value(noisy, static_cast<int>(last_selected));
    float a_selected = 0.f, a_unselected = 0.f, contribution[EPT];
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
      const int e = lane + j * kWarpSize;
      const bool is_selected = selected >> j & 1u;
      contribution[j] = 0.f;
      if (e < E && (!is_selected || runner >= 0)) {
        const float threshold = is_selected ? runner_value : last_value;
        contribution[j] = normal_pdf((clean[j] - threshold) / a.sigma) / a.sigma * d_load[e];
      }
      if (is_selected) a_selected += contribution[j];
      else a_unselected += contribution[j];
    }
    a_selected = warp_sum(a_selected);
    a_unselected = warp_sum(a_unselected);
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
      const int e = lane + j * kWarpSize;
      grad[j] += contribution[j] - (e == runner ? a_selected : 0.f) - (e == last_selected ? a_unselected : 0.f);
    }
  }
#pragma unroll
  for (int j = 0; j < EPT; ++j) {
    const int e = lane + j * kWarpSize;
    if (e < E) d_logits[token * E + e] = grad[j];
  }
}

size_t shared_bytes(int64_t num_experts) {
  // The weight tile, reused for the 3 partial arrays (3 * 8 * E < 32 * E floats); the x tile; flags.
  return (kTileD * num_experts + kTokensPerBlock * kTileD) * sizeof(float) + kTokensPerBlock * sizeof(int);
}

template <template <typename, int> class Launch, typename... Args>
cudaError_t dispatch(FloatType x_type, int64_t num_experts, Args&&... args) {
  const int ept = static_cast<int>((num_experts + kWarpSize - 1) / kWarpSize);
  const int slots = ept <= 1 ? 1 : ept <= 2 ? 2 : ept <= 4 ? 4 : 8;
#define SM4_GATING_CASE(T)                                                   \
  switch (slots) {                                                           \
    case 1: return Launch<T, 1>::run(std::forward<Args>(args)...);           \
    case 2: return Launch<T, 2>::run(std::forward<Args>(args)...);           \
    case 4: return Launch<T, 4>::run(std::forward<Args>(args)...);           \
    default: return Launch<T, 8>::run(std::forward<Args>(args)...);          \
  }
  switch (x_type) {
    case FloatType::kFloat32: SM4_GATING_CASE(float)
    case FloatType::kFloat16: SM4_GATING_CASE(__half)
    default: SM4_GATING_CASE(__nv_bfloat16)
  }
#undef SM4_GATING_CASE
}

template <typename x_t, int EPT>
struct ForwardLaunch {
  static cudaError_t run(const void* x, const GatingArgs& a, int64_t* ids, float* gates, float* entropy,
                         int64_t* runner_up, float* logits, float* block_importance, float* block_load,
                         int64_t* block_counts, cudaStream_t stream) {
    const int64_t blocks = topk_gating_num_blocks(a.num_tokens);
    SM4_LAUNCH(blocks, kThreads, shared_bytes(a.num_experts), stream, gating_forward_kernel<x_t, EPT>)(
        static_cast<const x_t*>(x), a, ids, gates, entropy, runner_up, logits, block_importance, block_load,
        block_counts);
    return cudaGetLastError();
  }
};

template <int EPT>
cudaError_t launch_backward(const float* logits, const GatingArgs& a, const int64_t* ids, const int64_t* runner_up,
                            const float* d_gates, const float* d_importance, const float* d_load, float* d_logits,
                            cudaStream_t stream) {
  const int64_t blocks = topk_gating_num_blocks(a.num_tokens);
  SM4_LAUNCH(blocks, kThreads, 0, stream, gating_backward_kernel<EPT>)(logits, a, ids, runner_up, d_gates, d_importance,
                                                              d_load, d_logits);
  return cudaGetLastError();
}

}  // namespace

int64_t topk_gating_num_blocks(int64_t num_tokens) {
  return (num_tokens + kTokensPerBlock - 1) / kTokensPerBlock;
}

cudaError_t launch_topk_gating_forward(const void* x, FloatType x_type, const float* weight, const float* noise,
                                       const int64_t* token_k, int64_t num_tokens, int64_t dim, int64_t num_experts,
                                       int64_t k, float sigma, bool renormalize, int64_t* ids, float* gates,
                                       float* entropy, int64_t* runner_up, float* logits, float* block_importance,
                                       float* block_load, int64_t* block_counts, cudaStream_t stream) {
  if (num_experts < 1 || num_experts > kGatingMaxExperts || k < 1 || k > num_experts) return cudaErrorInvalidValue;
  if (num_tokens == 0) return cudaSuccess;
  const GatingArgs a{weight, sigma > 0.f ? noise : nullptr, token_k, num_tokens, dim, num_experts, k, sigma, renormalize};
  return dispatch<ForwardLaunch>(x_type, num_experts, x, a, ids, gates, entropy, runner_up, logits,
                                 block_importance, block_load, block_counts, stream);
}

cudaError_t launch_topk_gating_backward(const float* logits, const float* noise, const int64_t* ids,
                                        const int64_t* runner_up, const float* d_gates, const float* d_importance,
                                        const float* d_load, int64_t num_tokens, int64_t num_experts, int64_t k,
                                        float sigma, bool renormalize, float* d_logits, cudaStream_t stream) {
  if (num_experts < 1 || num_experts > kGatingMaxExperts || k < 1 || k > num_experts) return cudaErrorInvalidValue;
  if (num_tokens == 0) return cudaSuccess;
  const GatingArgs a{nullptr, sigma > 0.f ? noise : nullptr, nullptr, num_tokens, 0, num_experts, k, sigma, renormalize};
  const int ept = static_cast<int>((num_experts + kWarpSize - 1) / kWarpSize);
  if (ept <= 1) return launch_backward<1>(logits, a, ids, runner_up, d_gates, d_importance, d_load, d_logits, stream);
  if (ept <= 2) return launch_backward<2>(logits, a, ids, runner_up, d_gates, d_importance, d_load, d_logits, stream);
  if (ept <= 4) return launch_backward<4>(logits, a, ids, runner_up, d_gates, d_importance, d_load, d_logits, stream);
  return launch_backward<8>(logits, a, ids, runner_up, d_gates, d_importance, d_load, d_logits, stream);
}

}  // namespace sm4::cuda
