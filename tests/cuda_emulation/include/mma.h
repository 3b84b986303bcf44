// nvcuda::wmma of the CPU emulation: m16n16k16 fragments of __half / __nv_bfloat16 (fp32
// accumulators), with the hardware's argument rules checked: a 256-bit aligned pointer and ldm a
// multiple of 16 bytes. Each lane holds 8 of the tile's 256 elements (lane l: row-major elements
// 8 l .. 8 l + 7; the real mapping is unspecified, and kernels that only load, mma and store cannot
// tell). load/store/fill act per lane; mma_sync is a warp collective (the last lane to arrive
// multiplies the whole tile from every lane's fragments).
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

constexpr int kTile = 16;
constexpr int kPerLane = kTile * kTile / 32;

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation has m16n16k16 only");
  static constexpr int num_elements = kPerLane;
  T x[kPerLane];
};

namespace detail {
inline float as_float(float v) { return v; }
inline float as_float(__half v) { return __half2float(v); }
inline float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
void check_arguments(cuda_emulation::Site site, const T* ptr, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) cuda_emulation::hazard(site, "wmma pointer is not 256-bit aligned");
  if ((ldm * sizeof(T)) % 16 != 0) cuda_emulation::hazard(site, "wmma ldm is not a multiple of 16 bytes");
}

// Element e of the lane's fragment is tile element (row, col) = ((8 lane + e) / 16, (8 lane + e) % 16).
template <typename Frag, typename Fn>
void for_each_element(Frag& frag, Fn fn) {
  const int lane = static_cast<int>(cuda_emulation::this_thread().lane);
  for (int e = 0; e < kPerLane; ++e) fn(frag.x[e], (lane * kPerLane + e) / kTile, (lane * kPerLane + e) % kTile);
}

struct MmaPayload {
  float* d;
  const void* a;
  const void* b;
  const float* c;
};

template <typename T>
void multiply(void* const* payloads) {
  float a[kTile][kTile], b[kTile][kTile], c[kTile][kTile];
  for (int lane = 0; lane < 32; ++lane) {
    const auto* p = static_cast<const MmaPayload*>(payloads[lane]);
    for (int e = 0; e < kPerLane; ++e) {
      const int r = (lane * kPerLane + e) / kTile, col = (lane * kPerLane + e) % kTile;
      a[r][col] = as_float(static_cast<const T*>(p->a)[e]);
      b[r][col] = as_float(static_cast<const T*>(p->b)[e]);
      c[r][col] = p->c[e];
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const auto* p = static_cast<const MmaPayload*>(payloads[lane]);
    for (int e = 0; e < kPerLane; ++e) {
      const int r = (lane * kPerLane + e) / kTile, col = (lane * kPerLane + e) % kTile;
      float acc = c[r][col];
      for (int k = 0; k < kTile; ++k) acc = std::fma(a[r][k], b[k][col], acc);  // products of 16-bit values are exact
      p->d[e] = acc;
    }
  }
}
}  // namespace detail

template <typename Use, typename T, typename Layout>
void load_matrix_sync_at(cuda_emulation::Site site, fragment<Use, 16, 16, 16, T, Layout>& frag, const T* ptr, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "an accumulator load needs a layout_t");
  detail::check_arguments(site, ptr, ldm);
  detail::for_each_element(frag, [&](T& v, int r, int c) {
    v = std::is_same_v<Layout, row_major> ? ptr[r * ldm + c] : ptr[c * ldm + r];
  });
}
template <typename T>
void load_matrix_sync_at(cuda_emulation::Site site, fragment<accumulator, 16, 16, 16, T>& frag, const T* ptr, unsigned ldm,
                         layout_t layout) {
  detail::check_arguments(site, ptr, ldm);
  detail::for_each_element(frag, [&](T& v, int r, int c) { v = layout == mem_row_major ? ptr[r * ldm + c] : ptr[c * ldm + r]; });
}
template <typename T>
void store_matrix_sync_at(cuda_emulation::Site site, T* ptr, const fragment<accumulator, 16, 16, 16, T>& frag, unsigned ldm,
                          layout_t layout) {
  detail::check_arguments(site, ptr, ldm);
  auto& f = const_cast<fragment<accumulator, 16, 16, 16, T>&>(frag);
  detail::for_each_element(f, [&](T& v, int r, int c) { (layout == mem_row_major ? ptr[r * ldm + c] : ptr[c * ldm + r]) = v; });
}
template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& frag, T value) {
  for (auto& v : frag.x) v = value;
}
template <typename T, typename LayoutA, typename LayoutB>
void mma_sync_at(cuda_emulation::Site site, fragment<accumulator, 16, 16, 16, float>& d,
                 const fragment<matrix_a, 16, 16, 16, T, LayoutA>& a, const fragment<matrix_b, 16, 16, 16, T, LayoutB>& b,
                 const fragment<accumulator, 16, 16, 16, float>& c) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "the emulation multiplies fp16 / bf16");
  detail::MmaPayload payload{d.x, a.x, b.x, c.x};
  cuda_emulation::warp_compute(site, 0xffffffffu, &payload, &detail::multiply<T>);
}

}  // namespace nvcuda::wmma

// The call site of each warp-wide wmma operation is recorded for the hazard checks.
#define load_matrix_sync(...) load_matrix_sync_at(CUDA_EMULATION_SITE, __VA_ARGS__)
#define store_matrix_sync(...) store_matrix_sync_at(CUDA_EMULATION_SITE, __VA_ARGS__)
#define mma_sync(...) mma_sync_at(CUDA_EMULATION_SITE, __VA_ARGS__)
// csrc/cuda/emulation_seams.cuh's fragment load from shared memory (inline PTX on the device).
#define SM4_WMMA_LOAD_SHARED(frag, ptr, ldm) ::nvcuda::wmma::load_matrix_sync_at(CUDA_EMULATION_SITE, frag, ptr, ldm)
