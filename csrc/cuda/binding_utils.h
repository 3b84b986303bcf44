// Helpers shared by the CUDA bindings (compiled with the host compiler, torch headers allowed).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include "launchers.h"

namespace sm4 {

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
