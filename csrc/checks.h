// Argument checks shared by the CPU kernels and the CUDA bindings (the Python API checks first
// and more thoroughly; these guard direct calls of torch.ops.sm4.*).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace sm4 {

// Put at the top of a kernel that calls at:: ops internally. Those calls are the kernel's own
// business: autograd must not record them, and autocast (still enabled in this thread when the
// op is called under torch.autocast) must not recast their inputs: an fp32 router GEMM turned
// bf16 would change results and dtypes behind the kernel's back.
struct KernelScope {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

// The argument errors raise c10::ValueError / c10::TypeError, which Python sees as ValueError /
// TypeError: the same vocabulary as sm4.ops' own checks.
inline void check_expert_ids(const at::Tensor& expert_ids, int64_t num_experts, const char* op) {
  TORCH_CHECK_VALUE(expert_ids.dim() == 2, op, ": expert_ids must have shape (T, k_max), got ", expert_ids.sizes());
  TORCH_CHECK_TYPE(expert_ids.scalar_type() == at::kLong || expert_ids.scalar_type() == at::kInt, op,
                   ": expert_ids must be int32 or int64, got ", expert_ids.scalar_type());
  TORCH_CHECK_VALUE(num_experts >= 1, op, ": num_experts must be >= 1, got ", num_experts);
}

}  // namespace sm4
