// CUDA binding of sm4::topk_gating_forward / topk_gating_backward: checks, dtype preparation
// (router weight, noise and gradients as fp32; token_k as int64), allocation, launch on the current
// stream, and the fixed-order sum of the per-block partials. Kernels: topk_gating.cu.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "binding_utils.h"
#include "launchers.h"

namespace sm4 {
namespace {

void check_gating(const at::Tensor& x, const at::Tensor& router_weight, int64_t k, const char* op) {
  TORCH_CHECK(on_kernel_device(x) && on_kernel_device(router_weight), op, ": x and router_weight must be CUDA tensors");
  TORCH_CHECK(x.dim() == 2, op, ": x must be (T, d), got ", x.dim(), " dims");
  TORCH_CHECK(router_weight.dim() == 2 && router_weight.size(0) == x.size(1), op,
              ": router_weight must be (d, E) with d = ", x.size(1), ", got ", router_weight.sizes());
  const int64_t experts = router_weight.size(1);
  TORCH_CHECK(experts >= 1 && experts <= cuda::kGatingMaxExperts, op, ": the CUDA kernels take 1 <= E <= ",
              cuda::kGatingMaxExperts, ", got E = ", experts);
  TORCH_CHECK(k >= 1 && k <= experts, op, ": need 1 <= k <= E, got k = ", k);
}

at::Tensor prepared_noise(const std::optional<at::Tensor>& noise, const at::Tensor& x, int64_t experts, double sigma,
                          const char* op) {
  if (sigma <= 0) return at::Tensor();
  TORCH_CHECK(noise.has_value() && noise->dim() == 2 && noise->size(0) == x.size(0) && noise->size(1) == experts,
              op, ": sigma > 0 needs a (T, E) noise tensor");
  return noise->to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
topk_gating_forward_cuda(const at::Tensor& x, const at::Tensor& router_weight, const std::optional<at::Tensor>& noise,
                         const std::optional<at::Tensor>& token_k, int64_t k, double sigma, bool renormalize) {
  const char* op = "sm4.topk_gating_forward";
  check_gating(x, router_weight, k, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor weight = router_weight.to(at::kFloat).contiguous();
  const int64_t T = x.size(0), E = weight.size(1);
  const at::Tensor eps = prepared_noise(noise, x, E, sigma, op);
  at::Tensor per_token_k;
  if (token_k.has_value()) {
    TORCH_CHECK(token_k->dim() == 1 && token_k->size(0) == T, op, ": token_k must be (T,)");
    per_token_k = token_k->to(at::kLong).contiguous();
  }
  const auto floats = x.options().dtype(at::kFloat), longs = x.options().dtype(at::kLong);
  at::Tensor ids = at::empty({T, k}, longs), gates = at::empty({T, k}, floats);
  at::Tensor entropy = at::empty({T}, floats), runner_up = at::empty({T}, longs);
  at::Tensor logits = at::empty({T, E}, floats);
  const int64_t blocks = std::max<int64_t>(cuda::topk_gating_num_blocks(T, E), 1);
  at::Tensor block_importance = at::zeros({blocks, E}, floats), block_load = at::zeros({blocks, E}, floats);
  at::Tensor block_counts = at::zeros({blocks, E}, longs);
  check_launch(cuda::launch_topk_gating_forward(
                   xc.data_ptr(), float_type(x, op), weight.data_ptr<float>(),
                   eps.defined() ? eps.data_ptr<float>() : nullptr,
                   per_token_k.defined() ? per_token_k.data_ptr<int64_t>() : nullptr, T, x.size(1), E, k,
                   static_cast<float>(sigma), renormalize, ids.data_ptr<int64_t>(), gates.data_ptr<float>(),
                   entropy.data_ptr<float>(), runner_up.data_ptr<int64_t>(), logits.data_ptr<float>(),
                   block_importance.data_ptr<float>(),
                   block_load.data_ptr<float>(), block_counts.data_ptr<int64_t>(),
                   current_stream()),
               op);
  // torch's sums over the block axis are deterministic (no atomics).
  return {gates, ids, entropy, block_importance.sum(0), block_load.sum(0), block_counts.sum(0), runner_up, logits};
}

at::Tensor topk_gating_backward_cuda(const at::Tensor& grad_gates, const at::Tensor& grad_importance,
                                     const at::Tensor& grad_load, const at::Tensor& logits,
                                     const std::optional<at::Tensor>& noise, const at::Tensor& expert_ids,
                                     const at::Tensor& runner_up, double sigma, bool renormalize) {
  const char* op = "sm4.topk_gating_backward";
  TORCH_CHECK(on_kernel_device(logits) && logits.dim() == 2, op, ": logits must be the forward's (T, E) CUDA logits");
  const int64_t T = logits.size(0), E = logits.size(1), k = expert_ids.size(1);
  TORCH_CHECK(E >= 1 && E <= cuda::kGatingMaxExperts && k >= 1 && k <= E, op, ": need 1 <= k <= E <= ",
              cuda::kGatingMaxExperts);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor saved = logits.to(at::kFloat).contiguous();
  const at::Tensor eps = prepared_noise(noise, saved, E, sigma, op);
  const at::Tensor ids = expert_ids.to(at::kLong).contiguous(), runners = runner_up.to(at::kLong).contiguous();
  const at::Tensor dg = grad_gates.to(at::kFloat).contiguous();
  const at::Tensor di = grad_importance.to(at::kFloat).contiguous(), dl = grad_load.to(at::kFloat).contiguous();
  at::Tensor d_logits = at::empty({T, E}, saved.options());
  check_launch(cuda::launch_topk_gating_backward(saved.data_ptr<float>(), eps.defined() ? eps.data_ptr<float>() : nullptr,
                                                 ids.data_ptr<int64_t>(), runners.data_ptr<int64_t>(), dg.data_ptr<float>(),
                                                 di.data_ptr<float>(), dl.data_ptr<float>(), T, E, k,
                                                 static_cast<float>(sigma), renormalize, d_logits.data_ptr<float>(),
                                                 current_stream()),
               op);
  return d_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(SM4_CUDA_OPS, SM4_CUDA_KEY, m) {
  m.impl("topk_gating_forward", &topk_gating_forward_cuda);
  m.impl("topk_gating_backward", &topk_gating_backward_cuda);
}

}  // namespace sm4
