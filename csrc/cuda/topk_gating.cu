// CUDA kernels of fused noisy top-k gating (SM4_SPEC §2; sm4/reference.py is the truth).
//
// Forward: a block of eight warps computes the logits of 64 tokens (32 for E > 128) together, so
// each tile of the router weight in shared memory serves them all and the whole (d, E) weight is
// read once per block: T / 64 times, 4 d bytes a token at E = 64 (32 d at E = 256, 32 tokens a
// block), where one block of 8 tokens read 32 d bytes a token at E = 64. Tiles of kTileD features
// of x (tokens x kTileD) and of the weight (kTileD x E, one contiguous run of global memory: 16-byte
// vector copies when E % 4 == 0, 32-bit indices, no division) go through shared memory; lane l of
// warp w accumulates experts l, l + 32, ... (E <= 256, at most 8 per lane) of the warp's 8 tokens
// (4 for E > 128) in fp32 registers, one fmaf per feature in order (the sums of one token per warp).
// The logits then wait in shared memory (the weight tile's space) and each warp routes its tokens
// one after another: shuffles for max / sum, k_max + 1 rounds of a warp argmax whose comparison is
// (value descending, index ascending), so ties go to the lower index; the (T, E) logits only reach
// global memory once, saved for the backward. Per-block partial sums of importance, load and
// counts are added per warp in token order, then over the warps in order, and written per block;
// the caller sums the blocks (no float atomics: deterministic). The backward is a per-token pass
// (a warp per token) with no GEMM and no second read of x; a saved expert id or runner-up outside
// [0, E) counts as inactive there (no access depends on it).
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
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarpSize;
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

struct GatingArgs {
  const float* weight;
  const float* noise;
  const int64_t* token_k;
  int64_t num_tokens, dim, num_experts, k;
  float sigma;
  bool renormalize;
  bool weight_vectors;  // weight rows move as 16-byte vectors (E % 4 == 0, 16-byte aligned base; host-decided)
};

// Tokens per block of the forward: every weight tile in shared memory serves them all, so the
// router weight is read T / tokens-per-block times (once per block). A warp accumulates the logits
// of its tokens_per_warp tokens (EPT * tokens_per_warp = 8 or 32 fp32 registers a lane).
template <int EPT>
struct ForwardTiling {
  static constexpr int kTokensPerWarp = EPT >= 8 ? 4 : 8;
  static constexpr int kTokensPerBlock = kWarps * kTokensPerWarp;  // 64, or 32 for E > 128
  // Shared floats: the weight tile, later the logits of the block's tokens, later the per-warp partials.
  static int64_t tile_floats(int64_t num_experts) {
    return (kTokensPerBlock > kTileD ? kTokensPerBlock : kTileD) * num_experts;
  }
};

// Rows [d0, d0 + kTileD) of the (d, E) router weight into w_tile (kTileD x E floats): one contiguous
// run of global memory, copied with 32-bit indices and no per-element division; rows past d are
// zero (so the last tile adds exact zeros, as a full one would).
__device__ __forceinline__ void load_weight_tile(const GatingArgs& a, int64_t d0, float* __restrict__ w_tile) {
  const int E = static_cast<int>(a.num_experts);
  const int rows = static_cast<int>(min(int64_t{kTileD}, a.dim - d0));
  const int n = rows * E;
  const float* __restrict__ src = a.weight + d0 * a.num_experts;
  if (a.weight_vectors) {  // n % 4 == 0 and src 16-byte aligned: E % 4 == 0
    const uint4* __restrict__ src4 = reinterpret_cast<const uint4*>(src);
    uint4* dst4 = reinterpret_cast<uint4*>(w_tile);
    for (int i = threadIdx.x; i < n / 4; i += kThreads) dst4[i] = src4[i];
  } else {
    for (int i = threadIdx.x; i < n; i += kThreads) w_tile[i] = src[i];
  }
  for (int i = n + threadIdx.x; i < kTileD * E; i += kThreads) w_tile[i] = 0.f;
}

// The block's logits: lane slot j of warp w accumulates expert lane + 32 j of its tokens
// w * TPW .. w * TPW + TPW - 1, over the tiles of d in order (one fmaf per feature: the same sums
// as one token per warp), and writes them to `stash` (tokens x E). bad_input[t] flags a non-finite
// element of token t's input (read as 0).
template <typename x_t, int EPT>
__device__ void block_logits(const x_t* __restrict__ x, const GatingArgs& a, int64_t first_token,
                             float* __restrict__ w_tile, float* __restrict__ x_tile, int* __restrict__ bad_input,
                             float* __restrict__ stash) {
  constexpr int TPW = ForwardTiling<EPT>::kTokensPerWarp, TPB = ForwardTiling<EPT>::kTokensPerBlock;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int E = static_cast<int>(a.num_experts);
  float acc[TPW][EPT];
#pragma unroll
  for (int i = 0; i < TPW; ++i)
#pragma unroll
    for (int j = 0; j < EPT; ++j) acc[i][j] = 0.f;
  for (int t = threadIdx.x; t < TPB; t += kThreads) bad_input[t] = 0;
  __syncthreads();
  for (int64_t d0 = 0; d0 < a.dim; d0 += kTileD) {
    // x tile (TPB x kTileD): each warp reads kTileD consecutive features of a token (coalesced).
    for (int i = threadIdx.x; i < TPB * kTileD; i += kThreads) {
      const int t = i / kTileD, col = i % kTileD;  // compile-time powers of two: a shift and a mask
      const int64_t token = first_token + t, feature = d0 + col;
      float v = 0.f;
      if (token < a.num_tokens && feature < a.dim) {
        v = load_float(x + token * a.dim + feature);
        if (!isfinite(v)) {
          bad_input[t] = 1;
          v = 0.f;
        }
      }
      x_tile[i] = v;
    }
    load_weight_tile(a, d0, w_tile);
    __syncthreads();
    const float* xw = x_tile + warp * TPW * kTileD;
#pragma unroll 2
    for (int r = 0; r < kTileD; ++r) {
      float wv[EPT];
#pragma unroll
      for (int j = 0; j < EPT; ++j) {
        const int e = lane + j * kWarpSize;
        wv[j] = e < E ? w_tile[r * E + e] : 0.f;
      }
#pragma unroll
      for (int i = 0; i < TPW; ++i) {
        const float xv = xw[i * kTileD + r];  // one broadcast read per token
#pragma unroll
        for (int j = 0; j < EPT; ++j) acc[i][j] = fmaf(xv, wv[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
  // The weight tile is dead: its space holds the logits from here.
#pragma unroll
  for (int i = 0; i < TPW; ++i)
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
      const int e = lane + j * kWarpSize;
      if (e < E) stash[(warp * TPW + i) * E + e] = acc[i][j];
    }
  __syncthreads();
}

// Routes one token on one warp from its clean logits (lane slot j = expert lane + 32 j): writes
// its ids, gates, entropy, runner-up and saved logits, and returns its importance q, smooth load
// and selection bits (zeros for a non-finite token, which is routed to the lowest experts with NaN
// gates). finite: its input and logits are finite; a non-finite noise row makes it non-finite too
// (as in the reference).
template <int EPT>
__device__ void route_token(const GatingArgs& a, int64_t token, float (&clean)[EPT], bool finite,
                            int64_t* __restrict__ ids, float* __restrict__ gates, float* __restrict__ entropy,
                            int64_t* __restrict__ runner_up, float* __restrict__ logits, float (&q)[EPT],
                            float (&load)[EPT], unsigned& selected) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t E = a.num_experts, K = a.k;
  const bool has_noise = a.sigma > 0.f;
  if (has_noise) {
    bool noise_ok = true;
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
      const int e = lane + j * kWarpSize;
      if (e < E && !isfinite(a.noise[token * E + e])) noise_ok = false;
    }
    finite = __all_sync(kFullMask, noise_ok) && finite;
  }
  int64_t kt = K;
  if (a.token_k != nullptr) kt = min(max(a.token_k[token], int64_t{1}), K);
#pragma unroll
  for (int j = 0; j < EPT; ++j) {
    const int e = lane + j * kWarpSize;
    if (e < E) logits[token * E + e] = finite ? clean[j] : NAN;  // saved for the backward
  }
  float noisy[EPT], probs[EPT];
  // The smooth load reuses the registers of the noisy logits once the selection (their last use)
  // is done (EPT = 8 would spill otherwise).
  float (&load_out)[EPT] = noisy;
  unsigned removed = 0;
  selected = 0;
#pragma unroll
  for (int j = 0; j < EPT; ++j) {
    const int e = lane + j * kWarpSize;
    const bool valid = e < E;
    if (!finite) clean[j] = 0.f;
    const float eps = (has_noise && valid) ? a.noise[token * E + e] : 0.f;
    noisy[j] = valid ? clean[j] + a.sigma * eps : -INFINITY;
    clean[j] = valid ? clean[j] : -INFINITY;
  }

  if (!finite) {
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
    return;
  }
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
      load_out[j] = normal_cdf((clean[j] - threshold) / a.sigma);
    } else {
      load_out[j] = is_selected ? 1.f : 0.f;
    }
  }
#pragma unroll
  for (int j = 0; j < EPT; ++j) load[j] = load_out[j];
}

template <typename x_t, int EPT>
__global__ void __launch_bounds__(kThreads, 2) gating_forward_kernel(
    const x_t* __restrict__ x, GatingArgs a, int64_t* __restrict__ ids, float* __restrict__ gates,
    float* __restrict__ entropy, int64_t* __restrict__ runner_up, float* __restrict__ logits,
    float* __restrict__ block_importance,
    float* __restrict__ block_load, int64_t* __restrict__ block_counts) {
  constexpr int TPW = ForwardTiling<EPT>::kTokensPerWarp, TPB = ForwardTiling<EPT>::kTokensPerBlock;
  SM4_DYNAMIC_SHARED(float, shared);
  const int E = static_cast<int>(a.num_experts);
  float* tile = shared;                                   // ForwardTiling::tile_floats(E)
  float* x_tile = tile + (TPB > kTileD ? TPB : kTileD) * E;  // TPB * kTileD
  int* bad_input = reinterpret_cast<int*>(x_tile + TPB * kTileD);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t first_token = blockIdx.x * int64_t(TPB);

  block_logits<x_t, EPT>(x, a, first_token, tile, x_tile, bad_input, tile);

  // Each warp routes its tokens in order and sums their contributions per expert slot (in
  // registers; counts 4 bits a slot: at most TPW = 8 <= 15 per warp).
  float importance_sum[EPT], load_sum[EPT];
  unsigned counts = 0;
#pragma unroll
  for (int j = 0; j < EPT; ++j) importance_sum[j] = load_sum[j] = 0.f;
  for (int i = 0; i < TPW; ++i) {
    const int t = warp * TPW + i;
    const int64_t token = first_token + t;
    if (token >= a.num_tokens) break;  // the same on every lane of the warp
    float clean[EPT], q[EPT], load[EPT];
    bool ok = bad_input[t] == 0;
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
      const int e = lane + j * kWarpSize;
      clean[j] = e < E ? tile[t * E + e] : 0.f;
      if (e < E && !isfinite(clean[j])) ok = false;
    }
    const bool finite = __all_sync(kFullMask, ok);
    unsigned selected;
    route_token<EPT>(a, token, clean, finite, ids, gates, entropy, runner_up, logits, q, load, selected);
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
      importance_sum[j] += q[j];  // zeros for a non-finite token
      load_sum[j] += load[j];
      counts += (selected >> j & 1u) << (4 * j);
    }
  }
  // The block's partials: per warp in shared (the logits are dead once every warp is done), then
  // summed over the warps in order.
  __syncthreads();
  float* importance_part = tile;  // kWarps * E each: 3 * 8 * E <= 32 * E floats
  float* load_part = importance_part + kWarps * E;
  float* count_part = load_part + kWarps * E;
#pragma unroll
  for (int j = 0; j < EPT; ++j) {
    const int e = lane + j * kWarpSize;
    if (e < E) {
      importance_part[warp * E + e] = importance_sum[j];
      load_part[warp * E + e] = load_sum[j];
      count_part[warp * E + e] = static_cast<float>(counts >> (4 * j) & 15u);
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += kThreads) {
    float importance_total = 0.f, load_total = 0.f;
    int64_t count = 0;
    for (int w = 0; w < kWarps; ++w) {
      importance_total += importance_part[w * E + e];
      load_total += load_part[w * E + e];
      count += static_cast<int64_t>(count_part[w * E + e]);
    }
    block_importance[blockIdx.x * a.num_experts + e] = importance_total;
    block_load[blockIdx.x * a.num_experts + e] = load_total;
    block_counts[blockIdx.x * a.num_experts + e] = count;
  }
}

template <int EPT>
__global__ void __launch_bounds__(kThreads, 2) gating_backward_kernel(
    const float* __restrict__ saved_logits, GatingArgs a, const int64_t* __restrict__ ids,
    const int64_t* __restrict__ runner_up, const float* __restrict__ d_gates, const float* __restrict__ d_importance,
    const float* __restrict__ d_load, float* __restrict__ d_logits) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t E = a.num_experts, K = a.k;
  const int64_t token = blockIdx.x * int64_t(kWarps) + warp;
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

  // Gates -> probabilities. The active ranks come first; -1 marks the inactive ones, and a saved id
  // outside [0, E) (bad input: checking it would be a host sync) counts as inactive too.
  unsigned selected = 0;
  float active_sum = 0.f, weighted = 0.f;
  int64_t last_selected = -1;
  for (int64_t r = 0; r < K; ++r) {
    const int64_t expert = ids[token * K + r];
    if (expert < 0 || expert >= E) continue;
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
    const int64_t saved_runner = runner_up[token];
    const int64_t runner = saved_runner >= 0 && saved_runner < E ? saved_runner : -1;  // outside [0, E): none
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

template <int EPT>
size_t shared_bytes(int64_t num_experts) {
  // The weight tile / logits / partials, the x tile, the bad-input flags.
  constexpr int TPB = ForwardTiling<EPT>::kTokensPerBlock;
  return (ForwardTiling<EPT>::tile_floats(num_experts) + TPB * kTileD) * sizeof(float) + TPB * sizeof(int);
}

int forward_tokens_per_block(int64_t num_experts) {
  return num_experts > 4 * kWarpSize ? ForwardTiling<8>::kTokensPerBlock : ForwardTiling<4>::kTokensPerBlock;
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
    static_assert(ForwardTiling<EPT>::kTokensPerBlock == (EPT > 4 ? ForwardTiling<8>::kTokensPerBlock
                                                                   : ForwardTiling<4>::kTokensPerBlock),
                  "forward_tokens_per_block must match the tiling");
    const int64_t blocks = topk_gating_num_blocks(a.num_tokens, a.num_experts);
    SM4_LAUNCH(blocks, kThreads, shared_bytes<EPT>(a.num_experts), stream, gating_forward_kernel<x_t, EPT>)(
        static_cast<const x_t*>(x), a, ids, gates, entropy, runner_up, logits, block_importance, block_load,
        block_counts);
    return cudaGetLastError();
  }
};

template <int EPT>
cudaError_t launch_backward(const float* logits, const GatingArgs& a, const int64_t* ids, const int64_t* runner_up,
                            const float* d_gates, const float* d_importance, const float* d_load, float* d_logits,
                            cudaStream_t stream) {
  const int64_t blocks = (a.num_tokens + kWarps - 1) / kWarps;  // a warp per token
  SM4_LAUNCH(blocks, kThreads, 0, stream, gating_backward_kernel<EPT>)(logits, a, ids, runner_up, d_gates, d_importance,
                                                              d_load, d_logits);
  return cudaGetLastError();
}

}  // namespace

int64_t topk_gating_num_blocks(int64_t num_tokens, int64_t num_experts) {
  const int64_t per_block = forward_tokens_per_block(num_experts);
  return (num_tokens + per_block - 1) / per_block;
}

cudaError_t launch_topk_gating_forward(const void* x, FloatType x_type, const float* weight, const float* noise,
                                       const int64_t* token_k, int64_t num_tokens, int64_t dim, int64_t num_experts,
                                       int64_t k, float sigma, bool renormalize, int64_t* ids, float* gates,
                                       float* entropy, int64_t* runner_up, float* logits, float* block_importance,
                                       float* block_load, int64_t* block_counts, cudaStream_t stream) {
  if (num_experts < 1 || num_experts > kGatingMaxExperts || k < 1 || k > num_experts) return cudaErrorInvalidValue;
  if (num_tokens == 0) return cudaSuccess;
  const bool weight_vectors = num_experts % 4 == 0 && reinterpret_cast<uintptr_t>(weight) % 16 == 0;
  const GatingArgs a{weight, sigma > 0.f ? noise : nullptr, token_k, num_tokens, dim, num_experts, k, sigma, renormalize,
                     weight_vectors};
  return dispatch<ForwardLaunch>(x_type, num_experts, x, a, ids, gates, entropy, runner_up, logits,
                                 block_importance, block_load, block_counts, stream);
}

cudaError_t launch_topk_gating_backward(const float* logits, const float* noise, const int64_t* ids,
                                        const int64_t* runner_up, const float* d_gates, const float* d_importance,
                                        const float* d_load, int64_t num_tokens, int64_t num_experts, int64_t k,
                                        float sigma, bool renormalize, float* d_logits, cudaStream_t stream) {
  if (num_experts < 1 || num_experts > kGatingMaxExperts || k < 1 || k > num_experts) return cudaErrorInvalidValue;
  if (num_tokens == 0) return cudaSuccess;
  const GatingArgs a{nullptr, sigma > 0.f ? noise : nullptr, nullptr, num_tokens, 0, num_experts, k, sigma, renormalize,
                     false};
  const int ept = static_cast<int>((num_experts + kWarpSize - 1) / kWarpSize);
  if (ept <= 1) return launch_backward<1>(logits, a, ids, runner_up, d_gates, d_importance, d_load, d_logits, stream);
  if (ept <= 2) return launch_backward<2>(logits, a, ids, runner_up, d_gates, d_importance, d_load, d_logits, stream);
  if (ept <= 4) return launch_backward<4>(logits, a, ids, runner_up, d_gates, d_importance, d_load, d_logits, stream);
  return launch_backward<8>(logits, a, ids, runner_up, d_gates, d_importance, d_load, d_logits, stream);
}

}  // namespace sm4::cuda
