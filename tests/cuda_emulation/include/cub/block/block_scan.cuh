// cub::BlockScan of the CPU emulation: the ExclusiveSum the kernels use, through shared memory and
// barriers like the real one (so a caller's missing barrier around TempStorage reuse shows up).
#pragma once

#include "cuda_runtime.h"

namespace cub {

template <typename T, int BLOCK_DIM_X>
class BlockScan {
 public:
  struct TempStorage {
    T values[BLOCK_DIM_X];
  };
  explicit BlockScan(TempStorage& storage) : storage_(storage) {}

  void ExclusiveSum(T input, T& output, T& block_aggregate) {
    const unsigned t = threadIdx.x;
    storage_.values[t] = input;
    __syncthreads();
    T prefix{}, total{};
    for (int i = 0; i < BLOCK_DIM_X; ++i) {
      if (i == static_cast<int>(t)) prefix = total;
      total += storage_.values[i];
    }
    output = prefix;
    block_aggregate = total;
    __syncthreads();
  }
  void ExclusiveSum(T input, T& output) {
    T aggregate;
    ExclusiveSum(input, output, aggregate);
  }

 private:
  TempStorage& storage_;
};

}  // namespace cub
