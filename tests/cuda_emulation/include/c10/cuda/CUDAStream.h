// Stand-in for c10/cuda/CUDAStream.h in the CPU emulation build of the CUDA bindings (a CPU torch
// has no libc10_cuda): the "current stream" is the null stream; kernels run synchronously.
#pragma once

#include <c10/core/Device.h>
#include <cuda_runtime.h>

namespace c10::cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace c10::cuda
