// CUDA binding of sm4::grouped_mm / grouped_weight_grad (kernels: grouped_gemm.cu): argument
// checks, contiguous inputs, scatter_scale as fp32, output allocation, launch on the current
// stream. The expert offsets are never read on the host (no .item(), no copy, no sync): the
// kernels read them on the device, and the launcher zeroes every output row no active row writes.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "binding_utils.h"
#include "launchers.h"

namespace sm4 {
namespace {

void check_device(const at::Tensor& t, const at::Tensor& a, const char* name, const char* op) {
  TORCH_CHECK(t.device() == a.device(), op, ": ", name, " must be on ", a.device(), " like a, got ", t.device());
}

void check_offsets(const at::Tensor& offsets, const at::Tensor& a, const char* op) {
  check_device(offsets, a, "expert_offsets", op);
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong, op, ": expert_offsets must be a 1-D int64 tensor, got ",
              offsets.sizes(), " ", offsets.scalar_type());
}

// A 1-D int64 index of `rows` entries on a's device, contiguous (or an undefined tensor).
at::Tensor index_tensor(const std::optional<at::Tensor>& index, const at::Tensor& a, int64_t rows, const char* name,
                        const char* op) {
  if (!index.has_value()) return at::Tensor();
  check_device(*index, a, name, op);
  TORCH_CHECK(index->dim() == 1 && index->scalar_type() == at::kLong, op, ": ", name, " must be a 1-D int64 tensor, got ",
              index->sizes(), " ", index->scalar_type());
  TORCH_CHECK(index->numel() == rows, op, ": ", name, " must have ", rows, " entries, got ", index->numel());
  return index->contiguous();
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_cuda(const at::Tensor& a, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, const at::Tensor& expert_offsets,
                                                   const std::optional<at::Tensor>& gather_index,
                                                   const std::optional<at::Tensor>& scatter_index,
                                                   const std::optional<at::Tensor>& scatter_scale, int64_t num_out_rows,
                                                   bool transpose_weight, int64_t activation, bool save_preact) {
  const char* op = "sm4.grouped_mm";
  TORCH_CHECK(on_kernel_device(a), op, ": a must be a CUDA tensor, got ", a.device());
  TORCH_CHECK(a.dim() == 2, op, ": a must be (rows, K), got ", a.sizes());
  TORCH_CHECK(weight.dim() == 3, op, ": weight must be (E, K, N) (or (E, N, K) with transpose_weight), got ", weight.sizes());
  const cuda::FloatType type = float_type(a, op);
  check_device(weight, a, "weight", op);
  TORCH_CHECK(weight.scalar_type() == a.scalar_type(), op, ": weight must have a's dtype ", a.scalar_type(), ", got ",
              weight.scalar_type());
  TORCH_CHECK(activation >= 0 && activation <= 2, op, ": activation must be 0 (none), 1 (gelu) or 2 (gelu_tanh), got ",
              activation);
  TORCH_CHECK(num_out_rows >= 0, op, ": num_out_rows must be >= 0, got ", num_out_rows);
  const int64_t E = weight.size(0);
  const int64_t K = transpose_weight ? weight.size(2) : weight.size(1);
  const int64_t N = transpose_weight ? weight.size(1) : weight.size(2);
  TORCH_CHECK(E >= 1, op, ": weight must hold at least one expert, got ", weight.sizes());
  TORCH_CHECK(a.size(1) == K, op, ": a has ", a.size(1), " features, weight ", weight.sizes(),
              transpose_weight ? " (transposed)" : "", " expects ", K);
  if (bias.has_value()) {
    check_device(*bias, a, "bias", op);
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == E && bias->size(1) == N && bias->scalar_type() == a.scalar_type(), op,
                ": bias must be (E, N) = (", E, ", ", N, ") ", a.scalar_type(), ", got ", bias->sizes(), " ",
                bias->scalar_type());
  }
  check_offsets(expert_offsets, a, op);
  TORCH_CHECK(expert_offsets.numel() == E + 1, op, ": expert_offsets must have E + 1 = ", E + 1, " entries, got ",
              expert_offsets.numel());
  const int64_t M = gather_index.has_value() ? gather_index->numel() : a.size(0);
  if (scatter_scale.has_value()) {
    check_device(*scatter_scale, a, "scatter_scale", op);
    TORCH_CHECK(scatter_scale->dim() == 1 && scatter_scale->numel() == M && scatter_scale->is_floating_point(), op,
                ": scatter_scale must be a float (", M, ",) tensor, got ", scatter_scale->sizes(), " ",
                scatter_scale->scalar_type());
  }

  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor gather = index_tensor(gather_index, a, M, "gather_index", op);
  const at::Tensor scatter = index_tensor(scatter_index, a, M, "scatter_index", op);
  const at::Tensor ac = a.contiguous(), wc = weight.contiguous(), offsets = expert_offsets.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor scale = scatter_scale.has_value() ? scatter_scale->to(at::kFloat).contiguous() : at::Tensor();
  const bool keep_preact = save_preact && activation != 0;
  at::Tensor out = at::empty({num_out_rows, N}, a.options());
  at::Tensor preact = at::empty({keep_preact ? M : 0, N}, a.options());
  at::Tensor workspace = at::empty({cuda::grouped_mm_workspace_elements(E)}, offsets.options());

  cuda::GroupedMmArgs args;
  args.a = ac.data_ptr();
  args.weight = wc.data_ptr();
  args.bias = bc.defined() ? bc.data_ptr() : nullptr;
  args.expert_offsets = offsets.data_ptr<int64_t>();
  args.gather_index = ptr_or_null<int64_t>(gather);
  args.scatter_index = ptr_or_null<int64_t>(scatter);
  args.scatter_scale = ptr_or_null<float>(scale);
  args.out = out.data_ptr();
  args.preact = keep_preact ? preact.data_ptr() : nullptr;
  args.workspace = workspace.data_ptr<int64_t>();
  args.type = type;
  args.a_rows = a.size(0);
  args.M = M;
  args.K = K;
  args.N = N;
  args.E = E;
  args.num_out_rows = num_out_rows;
  args.transpose_weight = transpose_weight;
  args.activation = static_cast<int>(activation);
  check_launch(cuda::launch_grouped_mm(args, current_stream()), op);
  return {out, preact};
}

std::tuple<at::Tensor, at::Tensor> grouped_weight_grad_cuda(const at::Tensor& a, const at::Tensor& grad,
                                                            const at::Tensor& expert_offsets,
                                                            const std::optional<at::Tensor>& a_index,
                                                            const std::optional<at::Tensor>& grad_index, bool compute_bias) {
  const char* op = "sm4.grouped_weight_grad";
  TORCH_CHECK(on_kernel_device(a), op, ": a must be a CUDA tensor, got ", a.device());
  TORCH_CHECK(a.dim() == 2 && grad.dim() == 2, op, ": need a (rows, K) and grad (rows, N), got ", a.sizes(), " and ",
              grad.sizes());
  const cuda::FloatType type = float_type(a, op);
  check_device(grad, a, "grad", op);
  TORCH_CHECK(grad.scalar_type() == a.scalar_type(), op, ": grad must have a's dtype ", a.scalar_type(), ", got ",
              grad.scalar_type());
  check_offsets(expert_offsets, a, op);
  const int64_t E = expert_offsets.numel() - 1;
  TORCH_CHECK(E >= 1, op, ": expert_offsets must have E + 1 >= 2 entries, got ", expert_offsets.numel());
  const int64_t M = a_index.has_value() ? a_index->numel() : a.size(0);
  TORCH_CHECK(grad_index.has_value() || grad.size(0) == M, op, ": grad has ", grad.size(0), " rows, expected ", M);
  const int64_t K = a.size(1), N = grad.size(1);

  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor ai = index_tensor(a_index, a, M, "a_index", op);
  const at::Tensor gi = index_tensor(grad_index, a, M, "grad_index", op);
  const at::Tensor ac = a.contiguous(), gc = grad.contiguous(), offsets = expert_offsets.contiguous();
  at::Tensor grad_weight = at::empty({E, K, N}, a.options());
  at::Tensor grad_bias = at::empty({compute_bias ? E : 0, N}, a.options());

  cuda::GroupedWeightGradArgs args;
  args.a = ac.data_ptr();
  args.grad = gc.data_ptr();
  args.expert_offsets = offsets.data_ptr<int64_t>();
  args.a_index = ptr_or_null<int64_t>(ai);
  args.grad_index = ptr_or_null<int64_t>(gi);
  args.grad_weight = grad_weight.data_ptr();
  args.grad_bias = compute_bias ? grad_bias.data_ptr() : nullptr;
  args.type = type;
  args.a_rows = a.size(0);
  args.grad_rows = grad.size(0);
  args.M = M;
  args.K = K;
  args.N = N;
  args.E = E;
  check_launch(cuda::launch_grouped_weight_grad(args, current_stream()), op);
  return {grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(SM4_CUDA_OPS, SM4_CUDA_KEY, m) {
  m.impl("grouped_mm", &grouped_mm_cuda);
  m.impl("grouped_weight_grad", &grouped_weight_grad_cuda);
}

}  // namespace sm4
