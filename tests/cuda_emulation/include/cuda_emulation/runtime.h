// A CPU emulation of the CUDA execution model, for running sm4's .cu files in the test suite.
//
// Every CUDA thread of a block is a fiber (glibc ucontext) on one OS thread; blocks run one after
// another. A fiber runs until it reaches a synchronisation point (__syncthreads, a warp collective,
// an mma) or exits; the scheduler then resumes the next runnable fiber in the configured order
// (forward, reverse or seeded-random: set_schedule), so the code between two synchronisation points
// of one thread runs without interruption, as a warp-synchronous GPU never guarantees. Results that
// depend on that order expose a missing barrier.
//
// Hazards end the launch with a sticky error (cudaGetLastError / cudaGetErrorString say which):
// lanes of a warp at one collective from different call sites or with different masks, a collective
// whose mask names an exited lane, a shuffle reading a lane outside the mask, threads of a block at
// different __syncthreads, a deadlock, and writes past either end of the dynamic shared memory
// (red zones checked at every barrier and at the end of each block).
//
// What it cannot run: inline PTX, TMA, wgmma, cp.async, clusters (the .cu files use none of them).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- CUDA's vector and launch types -------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorLaunchFailure = 719,
};

namespace cuda_emulation {

// Where a synchronisation point is in the source (collectives from different sites are a hazard).
struct Site {
  const char* file;
  int line;
};
#define CUDA_EMULATION_SITE (::cuda_emulation::Site{__FILE__, __LINE__})

enum class Schedule : int { kForward = 0, kReverse = 1, kRandom = 2 };
void set_schedule(Schedule order, uint64_t seed);

// The calling fiber's CUDA thread.
struct ThreadInfo {
  uint3 thread_idx;
  unsigned linear, lane, warp;
};
const ThreadInfo& this_thread();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

// Raises a hazard: records the message as the launch's error and abandons the launch.
[[noreturn]] void hazard(Site site, const char* what);

void syncthreads(Site site);

// Warp collectives. kind names the collective for the call-site check.
enum class WarpOp : int { kShfl, kShflXor, kShflUp, kShflDown, kBallot, kAll, kAny, kSyncwarp, kMma };
// Deposits `value` and the lane this lane reads (src_lane, -1 for none); returns once every lane of
// `mask` has arrived. reduce: ballot/all/any over the predicates; shuffles return the source's value.
uint64_t warp_collective(Site site, WarpOp op, unsigned mask, uint64_t value, int src_lane);
// A collective whose result the last lane to arrive computes from all lanes' payloads (mma).
using WarpCompute = void (*)(void* const* payloads);
void warp_compute(Site site, unsigned mask, void* payload, WarpCompute compute);

void* dynamic_shared();

// Runs body on grid x block fibers (blocks one after another). Returns false after a hazard.
void run_grid(const char* name, dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body);

// Sticky launch error and its message (as cudaGetLastError / cudaGetErrorString).
cudaError_t take_last_error();
cudaError_t peek_last_error();
void set_last_error(cudaError_t error);
const char* error_string(cudaError_t error);

inline dim3 as_dim3(dim3 d) { return d; }
template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
dim3 as_dim3(I n) {
  return dim3(static_cast<unsigned>(n));
}

// kernel<<<grid, block, shared, stream>>>(args...): the arguments are copied once, as CUDA copies
// them to the device, and every thread calls the kernel on those copies.
template <typename... Params>
struct Launch {
  const char* name;
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t shared;
  template <typename... Args>
  void operator()(Args&&... args) const {
    std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    auto* fn = kernel;
    run_grid(name, grid, block, shared, [&]() { std::apply(fn, params); });
  }
};
template <typename G, typename B, typename... Params>
Launch<Params...> launch(const char* name, G grid, B block, size_t shared, cudaStream_t, void (*kernel)(Params...)) {
  return Launch<Params...>{name, kernel, as_dim3(grid), as_dim3(block), shared};
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "shuffle of a type over 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// Shuffles: the source lane as the hardware computes it within segments of `width` lanes.
template <typename T>
T shfl_sync(Site site, unsigned mask, T v, int src, int width = 32) {
  const int lane = static_cast<int>(this_thread().lane), base = lane & ~(width - 1);
  return from_bits<T>(warp_collective(site, WarpOp::kShfl, mask, to_bits(v), base + (src & (width - 1))));
}
template <typename T>
T shfl_xor_sync(Site site, unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = static_cast<int>(this_thread().lane), base = lane & ~(width - 1);
  const int src = lane ^ lane_mask;
  return from_bits<T>(warp_collective(site, WarpOp::kShflXor, mask, to_bits(v), src < base + width ? src : lane));
}
template <typename T>
T shfl_up_sync(Site site, unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = static_cast<int>(this_thread().lane), base = lane & ~(width - 1);
  const int src = lane - static_cast<int>(delta);
  return from_bits<T>(warp_collective(site, WarpOp::kShflUp, mask, to_bits(v), src >= base ? src : lane));
}
template <typename T>
T shfl_down_sync(Site site, unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = static_cast<int>(this_thread().lane), base = lane & ~(width - 1);
  const int src = lane + static_cast<int>(delta);
  return from_bits<T>(warp_collective(site, WarpOp::kShflDown, mask, to_bits(v), src < base + width ? src : lane));
}

}  // namespace cuda_emulation
