// CUDA binding of the token permutation ops (kernels: permutation.cu). The block start rows of the
// metadata sort come from int64 cumsums here (deterministic, on the device, no host sync).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "binding_utils.h"
#include "launchers.h"

namespace sm4 {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> routing_metadata_cuda(const at::Tensor& expert_ids,
                                                                                          int64_t num_experts) {
  const char* op = "sm4.routing_metadata";
  check_expert_ids(expert_ids, num_experts, op);
  TORCH_CHECK(num_experts >= 1 && num_experts < 12 * 1024, op, ": the CUDA sort takes 1 <= E < 12288, got ", num_experts);
  const c10::cuda::CUDAGuard guard(expert_ids.device());
  const at::Tensor ids = expert_ids.to(at::kLong).contiguous();
  const int64_t tokens = ids.size(0), k = ids.size(1), n = ids.numel(), bins = num_experts + 1;
  const int64_t blocks = std::max<int64_t>((n + cuda::kSortBlock - 1) / cuda::kSortBlock, 1);
  const auto options = ids.options();
  at::Tensor block_counts = at::zeros({blocks, bins}, options);
  check_launch(cuda::launch_bin_counts(ids.data_ptr<int64_t>(), n, num_experts, block_counts.data_ptr<int64_t>(), current_stream()), op);
  const at::Tensor bin_totals = block_counts.sum(0);
  const at::Tensor bin_base = bin_totals.cumsum(0) - bin_totals;
  const at::Tensor block_start = (bin_base.unsqueeze(0) + block_counts.cumsum(0) - block_counts).contiguous();
  at::Tensor sorted_assignment = at::empty({n}, options), sorted_token = at::empty({n}, options);
  at::Tensor assignment_row = at::empty({tokens, k}, options);
  check_launch(cuda::launch_metadata_scatter(ids.data_ptr<int64_t>(), block_start.data_ptr<int64_t>(), n, num_experts, k,
                                      sorted_assignment.data_ptr<int64_t>(), sorted_token.data_ptr<int64_t>(),
                                      assignment_row.data_ptr<int64_t>(), current_stream()),
        op);
  return {bin_totals.narrow(0, 0, num_experts).clone(), bin_base.narrow(0, 0, num_experts + 1).clone(), sorted_assignment,
          sorted_token, assignment_row};
}

at::Tensor permute_cuda(const at::Tensor& x, const at::Tensor& assignment_row, const at::Tensor& expert_offsets) {
  const char* op = "sm4.permute";
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), rows = assignment_row.contiguous(), offsets = expert_offsets.contiguous();
  const int64_t tokens = rows.size(0), k = rows.size(1), dim = x.size(1);
  at::Tensor out = at::empty({tokens * k, dim}, x.options());
  // Padding first, then the rows: a bad offsets[E] cannot erase rows the scatter wrote.
  check_launch(cuda::launch_zero_rows_from(out.data_ptr(), float_type(x, op), offsets.data_ptr<int64_t>() + offsets.numel() - 1,
                                    tokens * k, dim, current_stream()),
        op);
  check_launch(cuda::launch_scatter_rows(xc.data_ptr(), float_type(x, op), rows.data_ptr<int64_t>(), tokens, k, tokens * k, dim,
                                         out.data_ptr(), current_stream()),
        op);
  return out;
}

at::Tensor combine(const at::Tensor& src_rows, const at::Tensor* weights, const at::Tensor& assignment_row, const char* op) {
  const c10::cuda::CUDAGuard guard(src_rows.device());
  const at::Tensor src = src_rows.contiguous(), rows = assignment_row.contiguous();
  const at::Tensor w = weights ? weights->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t tokens = rows.size(0), k = rows.size(1), dim = src.size(1);
  at::Tensor out = at::empty({tokens, dim}, src.options());
  check_launch(cuda::launch_combine_rows(src.data_ptr(), float_type(src, op), weights ? w.data_ptr<float>() : nullptr,
                                  rows.data_ptr<int64_t>(), tokens, k, src.size(0), dim, out.data_ptr(), current_stream()),
        op);
  return out;
}

at::Tensor permute_backward_cuda(const at::Tensor& grad_sorted, const at::Tensor& assignment_row) {
  return combine(grad_sorted, nullptr, assignment_row, "sm4.permute_backward");
}

at::Tensor unpermute_cuda(const at::Tensor& y_sorted, const at::Tensor& gates, const at::Tensor& assignment_row) {
  return combine(y_sorted, &gates, assignment_row, "sm4.unpermute");
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cuda(const at::Tensor& grad_y, const at::Tensor& y_sorted,
                                                           const at::Tensor& gates, const at::Tensor& assignment_row) {
  const char* op = "sm4.unpermute_backward";
  const c10::cuda::CUDAGuard guard(y_sorted.device());
  const at::Tensor gy = grad_y.contiguous(), y = y_sorted.contiguous(), rows = assignment_row.contiguous();
  const at::Tensor g = gates.to(at::kFloat).contiguous();
  const int64_t tokens = rows.size(0), k = rows.size(1), dim = y.size(1);
  at::Tensor grad_sorted = at::empty_like(y);
  at::Tensor grad_gates = at::empty({tokens, k}, g.options());
  // Rows from A on are not written: zero them first (then bad metadata cannot erase written rows), with A
  // (the in-range rows) counted on the device (no host sync).
  const at::Tensor active = ((rows >= 0) & (rows < y.size(0))).sum().to(at::kLong);
  check_launch(cuda::launch_zero_rows_from(grad_sorted.data_ptr(), float_type(y, op), active.data_ptr<int64_t>(), y.size(0), dim,
                                    current_stream()),
        op);
  check_launch(cuda::launch_unpermute_backward(gy.data_ptr(), y.data_ptr(), float_type(y, op), g.data_ptr<float>(),
                                        rows.data_ptr<int64_t>(), tokens, k, y.size(0), dim, grad_sorted.data_ptr(),
                                        grad_gates.data_ptr<float>(), current_stream()),
        op);
  return {grad_sorted, grad_gates.to(gates.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(SM4_CUDA_OPS, SM4_CUDA_KEY, m) {
  m.impl("routing_metadata", &routing_metadata_cuda);
  m.impl("permute", &permute_cuda);
  m.impl("permute_backward", &permute_backward_cuda);
  m.impl("unpermute", &unpermute_cuda);
  m.impl("unpermute_backward", &unpermute_backward_cuda);
}

}  // namespace sm4
