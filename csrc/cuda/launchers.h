// Plain C++ entry points of the CUDA kernels.
//
// The .cu files include no torch headers (nvcc compiles them in seconds instead of ~90 s, and the
// test suite can compile them for sm_80 and sm_90 on a machine with only nvcc); the torch binding
// of each op lives in a .cpp beside it and calls these launchers on the current stream.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace sm4::cuda {

// Counts assignments per expert and writes their exclusive prefix sum.
//   expert_ids: num_assignments ids (int32 if ids_are_int64 is false, else int64); -1 = none.
//   counts:  (num_experts,) int64, output.   offsets: (num_experts + 1,) int64, output.
// Ids outside [-1, num_experts) are not counted (checking them would need a host sync).
cudaError_t launch_expert_histogram(const void* expert_ids, bool ids_are_int64,
                                    int64_t num_assignments, int64_t num_experts, int64_t* counts,
                                    int64_t* offsets, cudaStream_t stream);

}  // namespace sm4::cuda
