// Stand-in for c10/cuda/CUDAGuard.h in the CPU emulation build of the CUDA bindings: there is one
// (emulated) device, so the guard has nothing to switch.
#pragma once

#include <c10/core/Device.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
