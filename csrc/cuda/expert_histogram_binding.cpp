// CUDA binding of sm4::expert_histogram: checks, allocation, and the launch on the current stream.
// The kernels themselves are in expert_histogram.cu.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "binding_utils.h"
#include "launchers.h"

namespace sm4 {
namespace {

std::tuple<at::Tensor, at::Tensor> expert_histogram_cuda(const at::Tensor& expert_ids,
                                                         int64_t num_experts) {
  check_expert_ids(expert_ids, num_experts, "sm4.expert_histogram");
  const c10::cuda::CUDAGuard guard(expert_ids.device());
  const at::Tensor ids = expert_ids.contiguous();
  at::Tensor counts = at::empty({num_experts}, ids.options().dtype(at::kLong));
  at::Tensor offsets = at::empty({num_experts + 1}, ids.options().dtype(at::kLong));
  const cudaError_t status = cuda::launch_expert_histogram(
      ids.data_ptr(), ids.scalar_type() == at::kLong, ids.numel(), num_experts,
      counts.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
      current_stream());
  check_launch(status, "sm4.expert_histogram");
  return {counts, offsets};
}

}  // namespace

TORCH_LIBRARY_IMPL(SM4_CUDA_OPS, SM4_CUDA_KEY, m) { m.impl("expert_histogram", &expert_histogram_cuda); }

}  // namespace sm4
