// CUDA kernels of the grouped GEMM (no torch headers: see launchers.h). Contract: csrc/sm4_ops.cpp
// (grouped_mm, grouped_weight_grad); plain-PyTorch truth: sm4/reference.py.
//
// Technique
// ---------
// * fp16 / bf16: tensor cores through WMMA (nvcuda::wmma m16n16k16, fp32 accumulator fragments).
//   Products of 16-bit values are exact in fp32 and every sum is fp32, as in the reference (which
//   computes in fp32); only the summation order differs. WMMA rather than raw mma.sync / wgmma: it
//   is portable across sm_80 and sm_90, its fragment layouts are the library's business (nothing
//   hand-derived to get wrong), and at these tile sizes it is a good fraction of peak.
// * fp32: exact fp32 SIMT FMA tiles (no TF32, whatever allowTF32CuBLAS says: the fp32 path is the
//   accuracy path; bf16/fp16 are the fast ones).
// * Scheduling without a host sync: the expert offsets stay on the device. A one-block kernel turns
//   them into a tile schedule (per expert: the tile prefix sum, first and end row). The GEMM grid
//   is an upper bound, (ceil(M / BM) + E) row tiles (each expert adds at most one partial tile)
//   times ceil(N / BN) column tiles; each block takes work items item = blockIdx.x, + gridDim.x, ...
//   (column tile fastest, so the blocks sharing a gathered A tile run together), finds its expert
//   by binary search over the tile prefix, and stops at the live item count (read on the device).
// * Forward: gather in the prologue (the per-row metadata, source row / destination row / scale,
//   is resolved once per tile into shared memory and the A tile rows are loaded through it), bias,
//   GELU and the scale in the fp32 epilogue, the scatter on store. K and N tails and rows past an
//   expert's end are zero-filled (loads) or masked (stores). Single shared buffer with register
//   prefetch: the next K step's global loads are in flight while the tensor cores work.
// * Rows no active row writes are zeroed by the launcher (a memset of out before a scatter, else
//   a kernel zeroing the rows from min(offsets[E], M) on, read on the device; likewise preact).
// * Weight grad: one block per (expert, K tile, N tile); it walks its expert's rows in steps of
//   kGradRows (bounds read from the offsets on the device), accumulating a_rows^T @ grad_rows in
//   fp32 fragments / registers, and writes its tile once. The blocks with K tile 0 also sum the grad
//   tile's columns for the bias. Fixed order everywhere, no atomics: deterministic.
//
// Conventions: expert e owns the sorted rows [begin_e, end_e) with begin_0 = 0, begin_e =
// clamp(offsets[e], 0, M), end_e = clamp(offsets[e + 1], begin_e, M), which is exactly the
// reference's searchsorted for non-decreasing offsets (rows before offsets[0] go to expert 0 there
// too). Index values outside their tensor (gather / a_index / grad_index outside [0, rows),
// scatter outside [0, num_out_rows)) cannot be checked without a host sync: a bad gather reads a
// zero row, a bad scatter drops the row. All row * stride products are int64.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "float_convert.cuh"
#include "emulation_seams.cuh"
#include "launchers.h"

namespace sm4::cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256;  // every GEMM block: 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kScheduleThreads = 1024;
constexpr int kZeroThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 30;  // grid.x cap; blocks loop over the items past it

// Tensor-core forward: BM x 128 output tile (BM = 128 or 64), K steps of 32.
constexpr int kTcBN = 128;
constexpr int kTcBK = 32;
constexpr int kTcPad = 8;  // 16-bit elements of padding per shared row: spreads banks, keeps 32 B alignment
// Tensor-core weight grad: 128 x 128 (K x N) output tile, 32 rows per step.
constexpr int kGradTile = 128;
constexpr int kGradRows = 32;
// fp32 SIMT (forward and weight grad): 64 x 64 output tile, reduction steps of 16, 4 x 4 per thread.
constexpr int kSimtTile = 64;
constexpr int kSimtStep = 16;
constexpr int kSimtLd = kSimtTile + 4;

__device__ __forceinline__ unsigned int bits16(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ unsigned int bits16(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

__device__ __forceinline__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }
__device__ __forceinline__ int64_t min64(int64_t x, int64_t y) { return x < y ? x : y; }

// activation: 0 none, 1 exact GELU (erf), 2 GELU tanh approximation (torch's formulas).
__device__ __forceinline__ float activate(float x, int activation) {
  if (activation == 1) return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
  if (activation == 2) return 0.5f * x * (1.f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
  return x;
}

// The sorted rows [begin, end) of expert e (see the conventions above).
__device__ __forceinline__ void expert_rows(const int64_t* offsets, int64_t e, int64_t num_rows, int64_t& begin,
                                            int64_t& end) {
  begin = e == 0 ? 0 : clamp64(offsets[e], 0, num_rows);
  end = clamp64(offsets[e + 1], begin, num_rows);
}

// Row index[i] (or i without an index) of a tensor with `rows` rows; -1 when out of range.
__device__ __forceinline__ int64_t source_row(const int64_t* index, int64_t i, int64_t rows) {
  const int64_t s = index ? index[i] : i;
  return s >= 0 && s < rows ? s : -1;
}

// Elements [col, col + 8) of a 16-bit row with `limit` columns as raw bits; zero past the end or
// for a null row. One 16-byte load when `vec` (limit % 8 == 0 and a 16-byte aligned row) and the
// chunk is whole, else element by element.
template <typename T>
__device__ __forceinline__ uint4 load_chunk8(const T* row, int64_t col, int64_t limit, bool vec) {
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (row == nullptr || col >= limit) return v;
  if (vec && col + 8 <= limit) return __ldg(reinterpret_cast<const uint4*>(row + col));
  unsigned int h[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) h[j] = col + j < limit ? bits16(row[col + j]) : 0u;
  v.x = h[0] | (h[1] << 16);
  v.y = h[2] | (h[3] << 16);
  v.z = h[4] | (h[5] << 16);
  v.w = h[6] | (h[7] << 16);
  return v;
}

// ---- tile schedule ------------------------------------------------------------------------------

// workspace: tile_prefix (E + 1): tiles of the experts before e (tile_prefix[E] = all tiles),
// row_begin (E), row_end (E). One block; each thread takes a run of experts, then a block scan.
__global__ void __launch_bounds__(kScheduleThreads) tile_schedule_kernel(const int64_t* __restrict__ offsets,
                                                                          int64_t num_experts, int64_t num_rows,
                                                                          int64_t tile_rows, int64_t* __restrict__ schedule) {
  __shared__ int64_t scan[kScheduleThreads];
  const int t = threadIdx.x;
  const int64_t per_thread = (num_experts + kScheduleThreads - 1) / kScheduleThreads;
  const int64_t e0 = min64(num_experts, t * per_thread), e1 = min64(num_experts, e0 + per_thread);
  int64_t local = 0;
  for (int64_t e = e0; e < e1; ++e) {
    int64_t begin, end;
    expert_rows(offsets, e, num_rows, begin, end);
    local += (end - begin + tile_rows - 1) / tile_rows;
  }
  scan[t] = local;
  __syncthreads();
  for (int stride = 1; stride < kScheduleThreads; stride <<= 1) {  // inclusive Hillis-Steele scan
    const int64_t add = t >= stride ? scan[t - stride] : 0;
    __syncthreads();
    scan[t] += add;
    __syncthreads();
  }
  int64_t running = scan[t] - local;
  for (int64_t e = e0; e < e1; ++e) {
    int64_t begin, end;
    expert_rows(offsets, e, num_rows, begin, end);
    schedule[e] = running;
    schedule[num_experts + 1 + e] = begin;
    schedule[2 * num_experts + 1 + e] = end;
    running += (end - begin + tile_rows - 1) / tile_rows;
  }
  if (t == kScheduleThreads - 1) schedule[num_experts] = scan[t];
}

// Zeroes rows [min(max(*first_row, 0), max_first, rows), rows) of a (rows, cols) matrix of
// Word-sized elements (all-zero bits are +0.0 in fp32, fp16 and bf16).
template <typename Word>
__global__ void zero_rows_from_kernel(Word* __restrict__ out, const int64_t* __restrict__ first_row, int64_t max_first,
                                      int64_t rows, int64_t cols) {
  const int64_t first = clamp64(*first_row, 0, min64(max_first, rows));
  const int64_t end = rows * cols;
  for (int64_t i = first * cols + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < end;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = Word(0);
}

// ---- forward ------------------------------------------------------------------------------------

struct MmParams {
  const void* a;
  const void* weight;
  const void* bias;
  const int64_t* gather;
  const int64_t* scatter;
  const float* scale;
  void* out;
  void* preact;
  const int64_t* schedule;  // tile_schedule_kernel's output
  int64_t a_rows, M, K, N, E, num_out_rows, n_tiles;
  int activation;
  bool a_vec, w_vec;  // 16-byte loads allowed for a's rows / weight's rows (16-bit path)
};

// Per-row metadata of the current tile, resolved once in the prologue.
template <int BM>
struct TileRows {
  int64_t row[BM];  // sorted row i (its preact row), or -1 past the expert's end
  int64_t src[BM];  // row of a to read, or -1: a zero row
  int64_t dst[BM];  // row of out to write, or -1: dropped
  float scale[BM];
};

// Prologue of one work item: finds its expert, fills `rows` and the bias of the column tile.
// Starts and ends with __syncthreads (the previous item is done with shared memory; the metadata
// is visible to all). Returns the expert.
template <typename T, int BM, int BN>
__device__ __forceinline__ int64_t prepare_tile(const MmParams& p, int64_t tile, int64_t n0, TileRows<BM>& rows,
                                                float (&bias)[BN], int64_t (&info)[2]) {
  __syncthreads();
  if (threadIdx.x == 0) {
    // The last expert e with tile_prefix[e] <= tile; tile < tile_prefix[E], so it owns the tile.
    const int64_t* prefix = p.schedule;
    int64_t lo = 0, hi = p.E - 1;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo + 1) / 2;
      if (prefix[mid] <= tile) lo = mid;
      else hi = mid - 1;
    }
    info[0] = lo;
    info[1] = p.schedule[p.E + 1 + lo] + (tile - prefix[lo]) * BM;
  }
  __syncthreads();
  const int64_t e = info[0], m0 = info[1], m_end = p.schedule[2 * p.E + 1 + e];
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    const int64_t i = m0 + r;
    if (i < m_end) {
      rows.row[r] = i;
      rows.src[r] = source_row(p.gather, i, p.a_rows);
      rows.dst[r] = source_row(p.scatter, i, p.num_out_rows);
      rows.scale[r] = p.scale ? p.scale[i] : 1.f;
    } else {
      rows.row[r] = rows.src[r] = rows.dst[r] = -1;
      rows.scale[r] = 0.f;
    }
  }
  const T* bias_e = p.bias ? static_cast<const T*>(p.bias) + e * p.N : nullptr;
  for (int c = threadIdx.x; c < BN; c += kThreads) bias[c] = bias_e && n0 + c < p.N ? to_float(bias_e[n0 + c]) : 0.f;
  __syncthreads();
  return e;
}

// Epilogue of one accumulator (tile row r, tile column c): bias, preact, activation, scale, scatter.
template <typename T, int BM, int BN>
__device__ __forceinline__ void emit(const MmParams& p, const TileRows<BM>& rows, const float (&bias)[BN], int r, int c,
                                     int64_t n0, float acc) {
  const int64_t n = n0 + c, i = rows.row[r];
  if (i < 0 || n >= p.N) return;
  const float pre = acc + bias[c];
  if (p.preact) static_cast<T*>(p.preact)[i * p.N + n] = from_float<T>(pre);
  const int64_t d = rows.dst[r];
  if (d >= 0) static_cast<T*>(p.out)[d * p.N + n] = from_float<T>(activate(pre, p.activation) * rows.scale[r]);
}

// 16-bit forward on tensor cores. 8 warps as (BM / 32) x (8 / (BM / 32)); each warp owns a 32 x kWN
// sub-tile (2 x kFN accumulator fragments). Shared: A tile [BM][kTcBK + pad] (row-major), B tile
// [kTcBK][kTcBN + pad] (row-major) or, transposed, [kTcBN][kTcBK + pad] (WMMA col_major); the
// epilogue reuses the same bytes as a per-warp 16 x kWN fp32 staging strip.
template <typename T, int BM, bool kTransB>
__global__ void __launch_bounds__(kThreads, 2) grouped_mm_tc_kernel(const MmParams p) {
  constexpr int kWarpsM = BM / 32, kWarpsN = kWarps / kWarpsM, kWN = kTcBN / kWarpsN, kFN = kWN / 16;
  constexpr int kLdA = kTcBK + kTcPad;
  constexpr int kLdB = kTransB ? kTcBK + kTcPad : kTcBN + kTcPad;
  constexpr int kBElems = kTransB ? kTcBN * kLdB : kTcBK * kLdB;
  constexpr int kLdS = kWN + 4;
  constexpr int kTileBytes = (BM * kLdA + kBElems) * int(sizeof(T));
  constexpr int kStageBytes = kWarps * 16 * kLdS * int(sizeof(float));
  constexpr int kAChunks = BM * (kTcBK / 8) / kThreads;  // 16-byte chunks per thread
  constexpr int kBChunks = kTcBK * (kTcBN / 8) / kThreads;
  static_assert(BM == 64 || BM == 128, "BM");
  static_assert(kAChunks * kThreads == BM * (kTcBK / 8) && kBChunks * kThreads == kTcBK * (kTcBN / 8), "chunks");
  static_assert(kWarpsM * kWarpsN == kWarps && kFN * 16 == kWN, "warp layout");
  using LayoutB = std::conditional_t<kTransB, wmma::col_major, wmma::row_major>;

  __shared__ __align__(128) unsigned char smem[kTileBytes > kStageBytes ? kTileBytes : kStageBytes];
  __shared__ TileRows<BM> rows;
  __shared__ float bias[kTcBN];
  __shared__ int64_t info[2];
  T* const As = reinterpret_cast<T*>(smem);
  T* const Bs = As + BM * kLdA;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  float* const stage = reinterpret_cast<float*>(smem) + warp * 16 * kLdS;
  const T* const a = static_cast<const T*>(p.a);
  const int64_t live = p.schedule[p.E] * p.n_tiles;

  for (int64_t item = blockIdx.x; item < live; item += gridDim.x) {
    const int64_t tile = item / p.n_tiles, n0 = (item % p.n_tiles) * kTcBN;
    const int64_t e = prepare_tile<T, BM, kTcBN>(p, tile, n0, rows, bias, info);
    const T* const w = static_cast<const T*>(p.weight) + e * p.K * p.N;

    uint4 ra[kAChunks], rb[kBChunks];
    auto load = [&](int64_t k0) {
#pragma unroll
      for (int it = 0; it < kAChunks; ++it) {
        const int id = tid + it * kThreads, r = id / (kTcBK / 8), kc = (id % (kTcBK / 8)) * 8;
        const int64_t src = rows.src[r];
        ra[it] = load_chunk8(src >= 0 ? a + src * p.K : nullptr, k0 + kc, p.K, p.a_vec);
      }
#pragma unroll
      for (int it = 0; it < kBChunks; ++it) {
        const int id = tid + it * kThreads;
        if constexpr (kTransB) {  // weight[e] is (N, K): rows n, contiguous along k
          const int n = id / (kTcBK / 8), kc = (id % (kTcBK / 8)) * 8;
          rb[it] = load_chunk8(n0 + n < p.N ? w + (n0 + n) * p.K : nullptr, k0 + kc, p.K, p.w_vec);
        } else {  // weight[e] is (K, N): rows k, contiguous along n
          const int kr = id / (kTcBN / 8), nc = (id % (kTcBN / 8)) * 8;
          rb[it] = load_chunk8(k0 + kr < p.K ? w + (k0 + kr) * p.N : nullptr, n0 + nc, p.N, p.w_vec);
        }
      }
    };
    auto store = [&]() {
#pragma unroll
      for (int it = 0; it < kAChunks; ++it) {
        const int id = tid + it * kThreads, r = id / (kTcBK / 8), kc = (id % (kTcBK / 8)) * 8;
        *reinterpret_cast<uint4*>(As + r * kLdA + kc) = ra[it];
      }
#pragma unroll
      for (int it = 0; it < kBChunks; ++it) {
        const int id = tid + it * kThreads;
        if constexpr (kTransB) {
          const int n = id / (kTcBK / 8), kc = (id % (kTcBK / 8)) * 8;
          *reinterpret_cast<uint4*>(Bs + n * kLdB + kc) = rb[it];
        } else {
          const int kr = id / (kTcBN / 8), nc = (id % (kTcBN / 8)) * 8;
          *reinterpret_cast<uint4*>(Bs + kr * kLdB + nc) = rb[it];
        }
      }
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][kFN];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < kFN; ++j) wmma::fill_fragment(acc[i][j], 0.f);

    const int64_t k_steps = (p.K + kTcBK - 1) / kTcBK;
    if (k_steps > 0) load(0);
    for (int64_t ks = 0; ks < k_steps; ++ks) {
      store();
      __syncthreads();
      if (ks + 1 < k_steps) load((ks + 1) * kTcBK);  // in flight during the MMAs below
#pragma unroll
      for (int kk = 0; kk < kTcBK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) SM4_WMMA_LOAD_SHARED(fa[i], As + (wm * 32 + i * 16) * kLdA + kk, kLdA);
#pragma unroll
        for (int j = 0; j < kFN; ++j) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> fb;
          const int col = wn * kWN + j * 16;
          SM4_WMMA_LOAD_SHARED(fb, kTransB ? Bs + col * kLdB + kk : Bs + kk * kLdB + col, kLdB);
#pragma unroll
          for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[i][j], fa[i], fb, acc[i][j]);
        }
      }
      __syncthreads();  // all warps are done with the tiles (and, after the last step, with smem)
    }

    // Epilogue: each warp stages 16 x kWN accumulators at a time; lanes walk the columns (coalesced).
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < kFN; ++j) wmma::store_matrix_sync(stage + j * 16, acc[i][j], kLdS, wmma::mem_row_major);
      __syncwarp();
      for (int rr = 0; rr < 16; ++rr) {
        const int r = wm * 32 + i * 16 + rr;
        for (int cc = lane; cc < kWN; cc += 32) emit<T, BM, kTcBN>(p, rows, bias, r, wn * kWN + cc, n0, stage[rr * kLdS + cc]);
      }
      __syncwarp();
    }
  }
}

// fp32 forward on SIMT cores: 64 x 64 tile, K steps of 16; thread (ty, tx) of 16 x 16 owns rows
// ty + 16 i and columns tx + 16 j (i, j < 4). Shared: As[k][m], Bs[k][n].
template <bool kTransB>
__global__ void __launch_bounds__(kThreads) grouped_mm_simt_kernel(const MmParams p) {
  constexpr int BM = kSimtTile, BN = kSimtTile, BK = kSimtStep;
  constexpr int kLoads = BM * BK / kThreads;
  static_assert(kLoads * kThreads == BM * BK && BN * BK == BM * BK, "loads");
  __shared__ float As[BK][kSimtLd];
  __shared__ float Bs[BK][kSimtLd];
  __shared__ TileRows<BM> rows;
  __shared__ float bias[BN];
  __shared__ int64_t info[2];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const float* const a = static_cast<const float*>(p.a);
  const int64_t live = p.schedule[p.E] * p.n_tiles;

  for (int64_t item = blockIdx.x; item < live; item += gridDim.x) {
    const int64_t tile = item / p.n_tiles, n0 = (item % p.n_tiles) * BN;
    const int64_t e = prepare_tile<float, BM, BN>(p, tile, n0, rows, bias, info);
    const float* const w = static_cast<const float*>(p.weight) + e * p.K * p.N;

    float ra[kLoads], rb[kLoads];
    auto load = [&](int64_t k0) {
#pragma unroll
      for (int it = 0; it < kLoads; ++it) {
        const int id = tid + it * kThreads;
        {
          const int r = id / BK, k = id % BK;
          const int64_t src = rows.src[r];
          ra[it] = src >= 0 && k0 + k < p.K ? a[src * p.K + k0 + k] : 0.f;
        }
        if constexpr (kTransB) {  // weight[e] is (N, K)
          const int c = id / BK, k = id % BK;
          rb[it] = k0 + k < p.K && n0 + c < p.N ? w[(n0 + c) * p.K + k0 + k] : 0.f;
        } else {  // weight[e] is (K, N)
          const int k = id / BN, c = id % BN;
          rb[it] = k0 + k < p.K && n0 + c < p.N ? w[(k0 + k) * p.N + n0 + c] : 0.f;
        }
      }
    };
    auto store = [&]() {
#pragma unroll
      for (int it = 0; it < kLoads; ++it) {
        const int id = tid + it * kThreads;
        As[id % BK][id / BK] = ra[it];
        if constexpr (kTransB) Bs[id % BK][id / BK] = rb[it];
        else Bs[id / BN][id % BN] = rb[it];
      }
    };

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

    const int64_t k_steps = (p.K + BK - 1) / BK;
    if (k_steps > 0) load(0);
    for (int64_t ks = 0; ks < k_steps; ++ks) {
      store();
      __syncthreads();
      if (ks + 1 < k_steps) load((ks + 1) * BK);
#pragma unroll
      for (int k = 0; k < BK; ++k) {
        float av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = As[k][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = Bs[k][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) emit<float, BM, BN>(p, rows, bias, ty + 16 * i, tx + 16 * j, n0, acc[i][j]);
  }
}

// ---- weight gradient ----------------------------------------------------------------------------

struct GradParams {
  const void* a;
  const void* grad;
  const int64_t* offsets;
  const int64_t* a_index;
  const int64_t* grad_index;
  void* grad_weight;
  void* grad_bias;  // null unless compute_bias
  int64_t a_rows, grad_rows, M, K, N, E, k_tiles, n_tiles;
  bool a_vec, g_vec;
};

// One weight-gradient work item: expert e's (K tile, N tile) output at (k0, n0), the expert's
// sorted rows [begin, end), and whether this item also sums the bias (the K-tile-0 items do).
struct GradItem {
  int64_t e, k0, n0, begin, end;
  bool with_bias;
};

template <int TK, int TN>
__device__ __forceinline__ GradItem grad_item(const GradParams& p, int64_t item) {
  const int64_t per_expert = p.k_tiles * p.n_tiles, rem = item % per_expert;
  GradItem work;
  work.e = item / per_expert;
  work.k0 = (rem / p.n_tiles) * TK;
  work.n0 = (rem % p.n_tiles) * TN;
  work.with_bias = p.grad_bias != nullptr && work.k0 == 0;
  expert_rows(p.offsets, work.e, p.M, work.begin, work.end);
  return work;
}

// 16-bit weight grad on tensor cores: work item (e, K tile, N tile), 128 x 128 output. Shared:
// As[row][k] and Bs[row][n] (32 rows each); a_rows^T is As read as a WMMA col_major matrix_a.
// 8 warps as 4 (K) x 2 (N), 32 x 64 each; the epilogue stages 16 x 64 fp32 strips in the same bytes.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) weight_grad_tc_kernel(const GradParams p) {
  constexpr int TK = kGradTile, TN = kGradTile, RB = kGradRows, kLd = kGradTile + kTcPad;
  constexpr int kWarpsN = 2, kWN = TN / kWarpsN, kFN = kWN / 16, kLdS = kWN + 4;
  constexpr int kChunks = RB * (TK / 8) / kThreads;
  constexpr int kTileBytes = 2 * RB * kLd * int(sizeof(T));
  constexpr int kStageBytes = kWarps * 16 * kLdS * int(sizeof(float));
  static_assert(kChunks * kThreads == RB * (TK / 8) && TK == TN, "chunks");
  static_assert((kWarps / kWarpsN) * 32 == TK && RB % 16 == 0, "warp layout");

  __shared__ __align__(128) unsigned char smem[kTileBytes > kStageBytes ? kTileBytes : kStageBytes];
  T* const As = reinterpret_cast<T*>(smem);
  T* const Bs = As + RB * kLd;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wk = warp / kWarpsN, wn = warp % kWarpsN;
  float* const stage = reinterpret_cast<float*>(smem) + warp * 16 * kLdS;
  const T* const a = static_cast<const T*>(p.a);
  const T* const g = static_cast<const T*>(p.grad);
  const int64_t items = p.E * p.k_tiles * p.n_tiles;

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const GradItem work = grad_item<TK, TN>(p, item);
    const int64_t e = work.e, k0 = work.k0, n0 = work.n0, begin = work.begin, end = work.end;
    const bool with_bias = work.with_bias;
    __syncthreads();  // the previous item is done with shared memory

    uint4 ra[kChunks], rg[kChunks];
    auto load = [&](int64_t r0) {
#pragma unroll
      for (int it = 0; it < kChunks; ++it) {
        const int id = tid + it * kThreads, r = id / (TK / 8), c = (id % (TK / 8)) * 8;
        const int64_t i = r0 + r;
        const int64_t as = i < end ? source_row(p.a_index, i, p.a_rows) : -1;
        const int64_t gs = i < end ? source_row(p.grad_index, i, p.grad_rows) : -1;
        ra[it] = load_chunk8(as >= 0 ? a + as * p.K : nullptr, k0 + c, p.K, p.a_vec);
        rg[it] = load_chunk8(gs >= 0 ? g + gs * p.N : nullptr, n0 + c, p.N, p.g_vec);
      }
    };
    auto store = [&]() {
#pragma unroll
      for (int it = 0; it < kChunks; ++it) {
        const int id = tid + it * kThreads, r = id / (TK / 8), c = (id % (TK / 8)) * 8;
        *reinterpret_cast<uint4*>(As + r * kLd + c) = ra[it];
        *reinterpret_cast<uint4*>(Bs + r * kLd + c) = rg[it];
      }
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][kFN];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < kFN; ++j) wmma::fill_fragment(acc[i][j], 0.f);
    float bias_sum = 0.f;

    const int64_t steps = (end - begin + RB - 1) / RB;
    if (steps > 0) load(begin);
    for (int64_t s = 0; s < steps; ++s) {
      store();
      __syncthreads();
      if (s + 1 < steps) load(begin + (s + 1) * RB);
      if (with_bias && tid < TN) {
        float step_sum = 0.f;  // rows in order; per-step partials keep the long sum accurate
        for (int r = 0; r < RB; ++r) step_sum += to_float(Bs[r * kLd + tid]);
        bias_sum += step_sum;
      }
#pragma unroll
      for (int kk = 0; kk < RB; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) SM4_WMMA_LOAD_SHARED(fa[i], As + kk * kLd + wk * 32 + i * 16, kLd);
#pragma unroll
        for (int j = 0; j < kFN; ++j) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
          SM4_WMMA_LOAD_SHARED(fb, Bs + kk * kLd + wn * kWN + j * 16, kLd);
#pragma unroll
          for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[i][j], fa[i], fb, acc[i][j]);
        }
      }
      __syncthreads();
    }

    T* const gw = static_cast<T*>(p.grad_weight) + e * p.K * p.N;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < kFN; ++j) wmma::store_matrix_sync(stage + j * 16, acc[i][j], kLdS, wmma::mem_row_major);
      __syncwarp();
      for (int rr = 0; rr < 16; ++rr) {
        const int64_t k = k0 + wk * 32 + i * 16 + rr;
        if (k >= p.K) break;
        for (int cc = lane; cc < kWN; cc += 32) {
          const int64_t n = n0 + wn * kWN + cc;
          if (n < p.N) gw[k * p.N + n] = from_float<T>(stage[rr * kLdS + cc]);
        }
      }
      __syncwarp();
    }
    if (with_bias && tid < TN && n0 + tid < p.N)
      static_cast<T*>(p.grad_bias)[e * p.N + n0 + tid] = from_float<T>(bias_sum);
  }
}

// fp32 weight grad on SIMT cores: work item (e, K tile, N tile), 64 x 64 output, 16 rows per step;
// thread (ty, tx) owns k = ty + 16 i, n = tx + 16 j. Shared: As[row][k], Bs[row][n].
__global__ void __launch_bounds__(kThreads) weight_grad_simt_kernel(const GradParams p) {
  constexpr int TK = kSimtTile, TN = kSimtTile, RB = kSimtStep;
  constexpr int kLoads = RB * TK / kThreads;
  static_assert(kLoads * kThreads == RB * TK && TK == TN, "loads");
  __shared__ float As[RB][kSimtLd];
  __shared__ float Bs[RB][kSimtLd];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const float* const a = static_cast<const float*>(p.a);
  const float* const g = static_cast<const float*>(p.grad);
  const int64_t items = p.E * p.k_tiles * p.n_tiles;

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const GradItem work = grad_item<TK, TN>(p, item);
    const int64_t e = work.e, k0 = work.k0, n0 = work.n0, begin = work.begin, end = work.end;
    const bool with_bias = work.with_bias;
    __syncthreads();  // the previous item is done with shared memory

    float ra[kLoads], rg[kLoads];
    auto load = [&](int64_t r0) {
#pragma unroll
      for (int it = 0; it < kLoads; ++it) {
        const int id = tid + it * kThreads, r = id / TK, c = id % TK;
        const int64_t i = r0 + r;
        const int64_t as = i < end ? source_row(p.a_index, i, p.a_rows) : -1;
        const int64_t gs = i < end ? source_row(p.grad_index, i, p.grad_rows) : -1;
        ra[it] = as >= 0 && k0 + c < p.K ? a[as * p.K + k0 + c] : 0.f;
        rg[it] = gs >= 0 && n0 + c < p.N ? g[gs * p.N + n0 + c] : 0.f;
      }
    };
    auto store = [&]() {
#pragma unroll
      for (int it = 0; it < kLoads; ++it) {
        const int id = tid + it * kThreads;
        As[id / TK][id % TK] = ra[it];
        Bs[id / TK][id % TK] = rg[it];
      }
    };

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    float bias_sum = 0.f;

    const int64_t steps = (end - begin + RB - 1) / RB;
    if (steps > 0) load(begin);
    for (int64_t s = 0; s < steps; ++s) {
      store();
      __syncthreads();
      if (s + 1 < steps) load(begin + (s + 1) * RB);
      if (with_bias && tid < TN) {
        float step_sum = 0.f;  // rows in order; per-step partials keep the long sum accurate
        for (int r = 0; r < RB; ++r) step_sum += Bs[r][tid];
        bias_sum += step_sum;
      }
#pragma unroll
      for (int r = 0; r < RB; ++r) {
        float av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = As[r][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = Bs[r][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
      __syncthreads();
    }

    float* const gw = static_cast<float*>(p.grad_weight) + e * p.K * p.N;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t k = k0 + ty + 16 * i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t n = n0 + tx + 16 * j;
        if (k < p.K && n < p.N) gw[k * p.N + n] = acc[i][j];
      }
    }
    if (with_bias && tid < TN && n0 + tid < p.N) static_cast<float*>(p.grad_bias)[e * p.N + n0 + tid] = bias_sum;
  }
}

// ---- launch helpers -----------------------------------------------------------------------------

int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

cudaError_t zero_rows_from(void* out, FloatType type, const int64_t* first_row, int64_t max_first, int64_t rows,
                           int64_t cols, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(rows * cols, kZeroThreads), 4096));
  if (type == FloatType::kFloat32)
    SM4_LAUNCH(blocks, kZeroThreads, 0, stream, zero_rows_from_kernel<uint32_t>)(static_cast<uint32_t*>(out), first_row, max_first,
                                                                         rows, cols);
  else
    SM4_LAUNCH(blocks, kZeroThreads, 0, stream, zero_rows_from_kernel<uint16_t>)(static_cast<uint16_t*>(out), first_row, max_first,
                                                                         rows, cols);
  return cudaGetLastError();
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T, int BM>
void launch_tc_forward(const MmParams& p, bool transpose, int64_t grid, cudaStream_t stream) {
  if (transpose) SM4_LAUNCH(static_cast<unsigned>(grid), kThreads, 0, stream, grouped_mm_tc_kernel<T, BM, true>)(p);
  else SM4_LAUNCH(static_cast<unsigned>(grid), kThreads, 0, stream, grouped_mm_tc_kernel<T, BM, false>)(p);
}

}  // namespace

int64_t grouped_mm_workspace_elements(int64_t num_experts) { return 3 * num_experts + 1; }

cudaError_t launch_grouped_mm(const GroupedMmArgs& x, cudaStream_t stream) {
  if (x.N == 0 || x.E < 1) return cudaSuccess;
  const bool fp32 = x.type == FloatType::kFloat32;
  const size_t element = fp32 ? 4 : 2;
  // Rows that no active row writes must be zero.
  cudaError_t status = cudaSuccess;
  if (x.scatter_index != nullptr) {
    if (x.num_out_rows > 0) status = cudaMemsetAsync(x.out, 0, static_cast<size_t>(x.num_out_rows * x.N) * element, stream);
  } else {
    status = zero_rows_from(x.out, x.type, x.expert_offsets + x.E, x.M, x.num_out_rows, x.N, stream);
  }
  if (status != cudaSuccess) return status;
  if (x.preact != nullptr) {
    status = zero_rows_from(x.preact, x.type, x.expert_offsets + x.E, x.M, x.M, x.N, stream);
    if (status != cudaSuccess) return status;
  }
  if (x.M == 0) return cudaSuccess;

  // Row tile: 64 for fp32; for 16-bit 128, or 64 when experts average fewer than 128 rows.
  const int tile_rows = fp32 || x.M < 128 * x.E ? 64 : 128;
  const int tile_cols = fp32 ? kSimtTile : kTcBN;
  SM4_LAUNCH(1, kScheduleThreads, 0, stream, tile_schedule_kernel)(x.expert_offsets, x.E, x.M, tile_rows, x.workspace);
  status = cudaGetLastError();
  if (status != cudaSuccess) return status;

  MmParams p{};
  p.a = x.a;
  p.weight = x.weight;
  p.bias = x.bias;
  p.gather = x.gather_index;
  p.scatter = x.scatter_index;
  p.scale = x.scatter_scale;
  p.out = x.out;
  p.preact = x.preact;
  p.schedule = x.workspace;
  p.a_rows = x.a_rows;
  p.M = x.M;
  p.K = x.K;
  p.N = x.N;
  p.E = x.E;
  p.num_out_rows = x.num_out_rows;
  p.n_tiles = ceil_div(x.N, tile_cols);
  p.activation = x.activation;
  p.a_vec = x.K % 8 == 0 && aligned16(x.a);
  p.w_vec = (x.transpose_weight ? x.K : x.N) % 8 == 0 && aligned16(x.weight);
  const int64_t items = (ceil_div(x.M, tile_rows) + x.E) * p.n_tiles;  // upper bound on the live items
  const int64_t grid = std::min(items, kMaxBlocks);

  switch (x.type) {
    case FloatType::kFloat32:
      if (x.transpose_weight) SM4_LAUNCH(static_cast<unsigned>(grid), kThreads, 0, stream, grouped_mm_simt_kernel<true>)(p);
      else SM4_LAUNCH(static_cast<unsigned>(grid), kThreads, 0, stream, grouped_mm_simt_kernel<false>)(p);
      break;
    case FloatType::kFloat16:
      if (tile_rows == 128) launch_tc_forward<__half, 128>(p, x.transpose_weight, grid, stream);
      else launch_tc_forward<__half, 64>(p, x.transpose_weight, grid, stream);
      break;
    default:
      if (tile_rows == 128) launch_tc_forward<__nv_bfloat16, 128>(p, x.transpose_weight, grid, stream);
      else launch_tc_forward<__nv_bfloat16, 64>(p, x.transpose_weight, grid, stream);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_grouped_weight_grad(const GroupedWeightGradArgs& x, cudaStream_t stream) {
  if (x.E < 1 || x.N == 0) return cudaSuccess;          // nothing to write
  if (x.K == 0 && x.grad_bias == nullptr) return cudaSuccess;
  const bool fp32 = x.type == FloatType::kFloat32;
  const int64_t tile = fp32 ? kSimtTile : kGradTile;
  GradParams p{};
  p.a = x.a;
  p.grad = x.grad;
  p.offsets = x.expert_offsets;
  p.a_index = x.a_index;
  p.grad_index = x.grad_index;
  p.grad_weight = x.grad_weight;
  p.grad_bias = x.grad_bias;
  p.a_rows = x.a_rows;
  p.grad_rows = x.grad_rows;
  p.M = x.M;
  p.K = x.K;
  p.N = x.N;
  p.E = x.E;
  p.k_tiles = std::max<int64_t>(ceil_div(x.K, tile), 1);  // K = 0 still needs the bias blocks
  p.n_tiles = ceil_div(x.N, tile);
  p.a_vec = x.K % 8 == 0 && aligned16(x.a);
  p.g_vec = x.N % 8 == 0 && aligned16(x.grad);
  const int64_t grid = std::min(x.E * p.k_tiles * p.n_tiles, kMaxBlocks);
  switch (x.type) {
    case FloatType::kFloat32:
      SM4_LAUNCH(static_cast<unsigned>(grid), kThreads, 0, stream, weight_grad_simt_kernel)(p);
      break;
    case FloatType::kFloat16:
      SM4_LAUNCH(static_cast<unsigned>(grid), kThreads, 0, stream, weight_grad_tc_kernel<__half>)(p);
      break;
    default:
      SM4_LAUNCH(static_cast<unsigned>(grid), kThreads, 0, stream, weight_grad_tc_kernel<__nv_bfloat16>)(p);
      break;
  }
  return cudaGetLastError();
}

}  // namespace sm4::cuda
