// CUDA binding of sm4::expert_histogram: checks, allocation, and the launch on the current stream.
// The kernels themselves are in expert_histogram.cu.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launchers.h"

namespace sm4 {
namespace {

std::tuple<at::Tensor, at::Tensor> expert_histogram_cuda(const at::Tensor& expert_ids,
                                                         int64_t num_experts) {
  TORCH_CHECK(expert_ids.dim() == 2, "sm4.expert_histogram: expert_ids must be (T, k_max), got ",
              expert_ids.dim(), " dims");
  TORCH_CHECK(expert_ids.scalar_type() == at::kLong || expert_ids.scalar_type() == at::kInt,
              "sm4.expert_histogram: expert_ids must be int32 or int64, got ", expert_ids.scalar_type());
  TORCH_CHECK(num_experts >= 1, "sm4.expert_histogram: num_experts must be >= 1, got ", num_experts);
  const c10::cuda::CUDAGuard guard(expert_ids.device());
  const at::Tensor ids = expert_ids.contiguous();
  at::Tensor counts = at::empty({num_experts}, ids.options().dtype(at::kLong));
  at::Tensor offsets = at::empty({num_experts + 1}, ids.options().dtype(at::kLong));
  const cudaError_t status = cuda::launch_expert_histogram(
      ids.data_ptr(), ids.scalar_type() == at::kLong, ids.numel(), num_experts,
      counts.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "sm4.expert_histogram: CUDA launch failed: ",
              cudaGetErrorString(status));
  return {counts, offsets};
}

}  // namespace

TORCH_LIBRARY_IMPL(sm4, CUDA, m) { m.impl("expert_histogram", &expert_histogram_cuda); }

}  // namespace sm4
