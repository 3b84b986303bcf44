// Helpers shared by the CUDA bindings (compiled with the host compiler, torch headers allowed).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include "launchers.h"

// Where the CUDA kernels register: sm4::* for the CUDA dispatch key. The test suite's CPU emulation
// (tests/cuda_emulation) compiles these bindings with -DSM4_CUDA_EMULATION into a CPU extension of
// its own: its own op namespace (sm4._C's CPU kernels own sm4::* on CPU) and the CPU key.
#ifdef SM4_CUDA_EMULATION
#define SM4_CUDA_OPS sm4_cuda_emulated
#define SM4_CUDA_KEY CPU
#else
#define SM4_CUDA_OPS sm4
#define SM4_CUDA_KEY CUDA
#endif

namespace sm4 {

// Whether t is on the device the kernels run on (a CUDA device; the CPU under emulation).
inline bool on_kernel_device(const at::Tensor& t) {
#ifdef SM4_CUDA_EMULATION
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(status));
}

// The element type the kernels read (they compute in fp32).
inline cuda::FloatType float_type(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::FloatType::kFloat32;
    case at::kHalf: return cuda::FloatType::kFloat16;
    case at::kBFloat16: return cuda::FloatType::kBFloat16;
    default: TORCH_CHECK(false, op, ": the CUDA kernels take fp32, fp16 or bf16, got ", t.scalar_type());
  }
}

}  // namespace sm4
