// cuda_runtime.h of the CPU emulation (see cuda_emulation/runtime.h): the execution-space
// keywords, the thread-index variables, __syncthreads, warp collectives, atomics, device math, the
// launch seam SM4_LAUNCH and the dynamic shared memory seam SM4_DYNAMIC_SHARED used by csrc/cuda.
#pragma once

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cuda_emulation/runtime.h"

#define SM4_CUDA_EMULATED 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Shared memory: one copy per OS thread, shared by the fibers of the block that runs there.
#define __shared__ static thread_local

#define threadIdx (::cuda_emulation::this_thread().thread_idx)
#define blockIdx (::cuda_emulation::block_idx())
#define blockDim (::cuda_emulation::block_dim())
#define gridDim (::cuda_emulation::grid_dim())
#define warpSize 32

#define __syncthreads() ::cuda_emulation::syncthreads(CUDA_EMULATION_SITE)
#define __syncwarp(...) ::cuda_emulation::syncwarp(CUDA_EMULATION_SITE __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(...) ::cuda_emulation::shfl_sync(CUDA_EMULATION_SITE, __VA_ARGS__)
#define __shfl_xor_sync(...) ::cuda_emulation::shfl_xor_sync(CUDA_EMULATION_SITE, __VA_ARGS__)
#define __shfl_up_sync(...) ::cuda_emulation::shfl_up_sync(CUDA_EMULATION_SITE, __VA_ARGS__)
#define __shfl_down_sync(...) ::cuda_emulation::shfl_down_sync(CUDA_EMULATION_SITE, __VA_ARGS__)
#define __ballot_sync(mask, pred) ::cuda_emulation::vote(CUDA_EMULATION_SITE, ::cuda_emulation::WarpOp::kBallot, mask, pred)
#define __all_sync(mask, pred) (::cuda_emulation::vote(CUDA_EMULATION_SITE, ::cuda_emulation::WarpOp::kAll, mask, pred) != 0)
#define __any_sync(mask, pred) (::cuda_emulation::vote(CUDA_EMULATION_SITE, ::cuda_emulation::WarpOp::kAny, mask, pred) != 0)

// kernel<<<grid, block, shared, stream>>>(args) is written SM4_LAUNCH(grid, block, shared, stream, kernel)(args).
#define SM4_LAUNCH(grid, block, shared, stream, ...) \
  ::cuda_emulation::launch(#__VA_ARGS__, grid, block, shared, stream, __VA_ARGS__)
// extern __shared__ T name[] is written SM4_DYNAMIC_SHARED(T, name).
#define SM4_DYNAMIC_SHARED(type, name) type* const name = static_cast<type*>(::cuda_emulation::dynamic_shared())

namespace cuda_emulation {
inline void syncwarp(Site site, unsigned mask = 0xffffffffu) { warp_collective(site, WarpOp::kSyncwarp, mask, 0, -1); }
inline unsigned vote(Site site, WarpOp op, unsigned mask, bool pred) {
  return static_cast<unsigned>(warp_collective(site, op, mask, pred ? 1 : 0, -1));
}
}  // namespace cuda_emulation

// ---- atomics: fibers switch only at synchronisation points, but blocks may one day run on several
// OS threads, so these are real atomics.
template <typename T>
T atomicAdd(T* address, T value) {
  return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}
inline float atomicAdd(float* address, float value) {
  float old = *address, desired;
  do desired = old + value;
  while (!__atomic_compare_exchange(address, &old, &desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return old;
}
template <typename T>
T atomicMax(T* address, T value) {
  return __atomic_fetch_max(address, value, __ATOMIC_RELAXED);
}
template <typename T>
T atomicMin(T* address, T value) {
  return __atomic_fetch_min(address, value, __ATOMIC_RELAXED);
}

template <typename T>
T __ldg(const T* p) {
  return *p;
}

// ---- device math: CUDA's overloads in the global namespace ---------------------------------------
using std::isfinite;
using std::isinf;
using std::isnan;
template <typename T>
constexpr T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
constexpr T max(T a, T b) {
  return a < b ? b : a;
}
// The fast intrinsics: libm's accurate versions (within the intrinsics' documented error).
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float x, float y) { return x / y; }

// ---- host API --------------------------------------------------------------------------------------
inline cudaError_t cudaGetLastError() { return ::cuda_emulation::take_last_error(); }
inline cudaError_t cudaPeekAtLastError() { return ::cuda_emulation::peek_last_error(); }
inline const char* cudaGetErrorString(cudaError_t error) { return ::cuda_emulation::error_string(error); }
inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
  if (bytes) std::memset(ptr, value, bytes);
  return cudaSuccess;
}
