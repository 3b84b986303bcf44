// The CUDA constructs the .cu files spell through a macro, so that the test suite's CPU emulation
// (tests/cuda_emulation) can compile them with a plain C++ compiler: kernel launches, dynamic
// shared memory, and WMMA fragment loads from shared memory. Under nvcc the macros are the CUDA
// code below; the emulation's cuda_runtime.h and mma.h define their own versions (and
// SM4_CUDA_EMULATED).
//   SM4_LAUNCH(grid, block, shared_bytes, stream, kernel)(args...)  =  kernel<<<grid, block, shared_bytes, stream>>>(args...)
//   SM4_DYNAMIC_SHARED(T, name);                                    =  extern __shared__ T name[];
//   SM4_WMMA_LOAD_SHARED(frag, ptr, ldm);                           =  wmma::load_matrix_sync(frag, ptr, ldm), ptr in shared memory
#pragma once

#include <cuda_runtime.h>

#ifndef SM4_CUDA_EMULATED
#include <cuda_bf16.h>
#include <mma.h>

#define SM4_LAUNCH(grid, block, shared_bytes, stream, ...) __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
#define SM4_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#define SM4_WMMA_LOAD_SHARED(frag, ptr, ldm) ::sm4::cuda::seams::wmma_load_shared(frag, ptr, ldm)

namespace sm4::cuda::seams {

// Any fragment but bf16 m16n16k16 A/B: the library's load (for fp16, ptxas already makes it LDSM).
template <typename Fragment, typename T>
__device__ __forceinline__ void wmma_load_shared(Fragment& frag, const T* ptr, unsigned ldm) {
  nvcuda::wmma::load_matrix_sync(frag, ptr, ldm);
}

// bf16 A/B fragments: the library's bf16 load reaches PTX as a generic-address wmma.load, which
// ptxas turns into generic 32-bit loads plus MOVM transposes; the same instruction with the .shared
// state space becomes LDSM (ldmatrix), as fp16 does. Same instruction, same fragment registers (four
// 32-bit words of two bf16 each), so the results are the library's. volatile + "memory": the load
// must not be merged across k steps (same address, new data) nor moved across the barriers.
#define SM4_SEAMS_BF16_LOAD(USE, LAYOUT, PTX_USE, PTX_LAYOUT)                                                          \
  __device__ __forceinline__ void wmma_load_shared(                                                                   \
      nvcuda::wmma::fragment<nvcuda::wmma::USE, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::LAYOUT>& frag,             \
      const __nv_bfloat16* ptr, unsigned ldm) {                                                                       \
    unsigned* const r = reinterpret_cast<unsigned*>(frag.x);                                                          \
    const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(ptr));                                    \
    asm volatile("wmma.load." PTX_USE ".sync.aligned." PTX_LAYOUT ".m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;" \
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                                                     \
                 : "r"(address), "r"(ldm)                                                                             \
                 : "memory");                                                                                         \
  }
SM4_SEAMS_BF16_LOAD(matrix_a, row_major, "a", "row")
SM4_SEAMS_BF16_LOAD(matrix_a, col_major, "a", "col")
SM4_SEAMS_BF16_LOAD(matrix_b, row_major, "b", "row")
SM4_SEAMS_BF16_LOAD(matrix_b, col_major, "b", "col")
#undef SM4_SEAMS_BF16_LOAD

}  // namespace sm4::cuda::seams
#endif
