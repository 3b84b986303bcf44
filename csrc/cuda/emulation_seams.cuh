// The two CUDA constructs the .cu files spell through a macro, so that the test suite's CPU
// emulation (tests/cuda_emulation) can compile them with a plain C++ compiler: kernel launches and
// dynamic shared memory. Under nvcc the macros are exactly the CUDA syntax; the emulation's
// cuda_runtime.h defines its own versions (and SM4_CUDA_EMULATED).
//   SM4_LAUNCH(grid, block, shared_bytes, stream, kernel)(args...)  =  kernel<<<grid, block, shared_bytes, stream>>>(args...)
//   SM4_DYNAMIC_SHARED(T, name);                                    =  extern __shared__ T name[];
#pragma once

#include <cuda_runtime.h>

#ifndef SM4_CUDA_EMULATED
#define SM4_LAUNCH(grid, block, shared_bytes, stream, ...) __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
#define SM4_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif
