// CPU kernels of the grouped expert GEMMs: grouped_mm (forward and input gradient, with gather,
// bias, GELU, gate scale and scatter fused around the GEMM) and grouped_weight_grad.
// Contract: csrc/sm4_ops.cpp; ground truth: sm4/reference.py grouped_mm / grouped_weight_grad.
//
// Technique: the work is cut into (expert, row block) items, run in parallel; each item gathers
// its rows (when there is a gather index) into a contiguous block and calls at::mm / at::addmm on
// it (MKL or oneDNN: far faster than anything hand-written here), then runs the epilogue (GELU,
// scale, scatter) on the block while it is still in cache. The offsets are read directly: on CPU
// tensors that is a memory read, not a device sync. Low-precision inputs (fp16/bf16) go through
// the library GEMM in their own dtype, which accumulates in fp32 and rounds once per output, as
// plain PyTorch does; the epilogue then computes in fp32.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <vector>

namespace sm4 {
namespace {

// Rows per work item: big enough for an efficient GEMM, small enough to spread an expert that
// owns most rows over every thread.
constexpr int64_t kRowBlock = 512;

struct WorkItem {
  int64_t expert, first_row, rows;
};

// Reads expert_offsets (a CPU tensor: no sync), checks it, and cuts each expert into row blocks.
std::vector<WorkItem> plan_work(const at::Tensor& expert_offsets, int64_t num_experts, int64_t num_rows, const char* op) {
  TORCH_CHECK(expert_offsets.dim() == 1 && expert_offsets.numel() == num_experts + 1 &&
                  expert_offsets.scalar_type() == at::kLong,
              op, ": expert_offsets must be (E + 1,) = (", num_experts + 1, ",) int64, got ", expert_offsets.sizes(), " ",
              expert_offsets.scalar_type());
  const at::Tensor offsets = expert_offsets.contiguous();
  const int64_t* offset = offsets.data_ptr<int64_t>();
  TORCH_CHECK(offset[0] == 0 && offset[num_experts] <= num_rows, op, ": expert_offsets must start at 0 and end at most at ",
              num_rows, " (the number of rows), got [", offset[0], ", ..., ", offset[num_experts], "]");
  std::vector<WorkItem> items;
  for (int64_t e = 0; e < num_experts; ++e) {
    TORCH_CHECK(offset[e] <= offset[e + 1], op, ": expert_offsets must be non-decreasing, got ", offset[e], " then ",
                offset[e + 1], " at expert ", e);
    for (int64_t row = offset[e]; row < offset[e + 1]; row += kRowBlock)
      items.push_back({e, row, std::min(kRowBlock, offset[e + 1] - row)});
  }
  return items;
}

// Rows [first, first + count) of the sorted order, read through the index when there is one.
at::Tensor sorted_rows(const at::Tensor& source, const c10::optional<at::Tensor>& index, int64_t first, int64_t count) {
  if (!index) return source.narrow(0, first, count);
  return source.index_select(0, index->narrow(0, first, count));
}

void check_index(const c10::optional<at::Tensor>& index, const char* name, int64_t rows, int64_t bound, const char* op) {
  if (!index) return;
  TORCH_CHECK(index->dim() == 1 && index->scalar_type() == at::kLong, op, ": ", name, " must be 1-D int64, got ",
              index->sizes(), " ", index->scalar_type());
  TORCH_CHECK(index->numel() == rows, op, ": ", name, " must have ", rows, " entries, got ", index->numel());
  if (rows) {
    const auto [low, high] = at::aminmax(*index);
    TORCH_CHECK(low.item<int64_t>() >= 0 && high.item<int64_t>() < bound, op, ": ", name, " values must lie in [0, ", bound,
                "), got [", low.item<int64_t>(), ", ", high.item<int64_t>(), "]");
  }
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_cpu(const at::Tensor& a_in, const at::Tensor& weight,
                                                  const c10::optional<at::Tensor>& bias_in, const at::Tensor& expert_offsets,
                                                  const c10::optional<at::Tensor>& gather_index,
                                                  const c10::optional<at::Tensor>& scatter_index,
                                                  const c10::optional<at::Tensor>& scatter_scale, int64_t num_out_rows,
                                                  bool transpose_weight, int64_t activation, bool save_preact) {
  const char* op = "sm4.grouped_mm";
  // The at:: calls below are this kernel's internals, not ops for autograd to record. The guard
  // covers this thread; at::parallel_for's workers do not inherit it, hence also the detach()es.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor a = a_in.detach();
  const c10::optional<at::Tensor> bias = bias_in ? c10::optional<at::Tensor>(bias_in->detach()) : c10::nullopt;
  TORCH_CHECK(a.dim() == 2 && weight.dim() == 3, op, ": need a (rows, K) and weight (E, K, N) (or (E, N, K) transposed), got ",
              a.sizes(), " and ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == a.scalar_type(), op, ": weight must have a's dtype ", a.scalar_type(), ", got ",
              weight.scalar_type());
  TORCH_CHECK(activation >= 0 && activation <= 2, op, ": activation must be 0 (none), 1 (gelu) or 2 (gelu_tanh), got ", activation);
  const int64_t num_experts = weight.size(0);
  const int64_t in_features = transpose_weight ? weight.size(2) : weight.size(1);
  const int64_t out_features = transpose_weight ? weight.size(1) : weight.size(2);
  TORCH_CHECK(a.size(1) == in_features, op, ": a has ", a.size(1), " features, weight expects ", in_features);
  if (bias) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == num_experts && bias->size(1) == out_features &&
                    bias->scalar_type() == a.scalar_type(),
                op, ": bias must be (E, N) = (", num_experts, ", ", out_features, ") ", a.scalar_type(), ", got ",
                bias->sizes(), " ", bias->scalar_type());
  }
  const int64_t rows = gather_index ? gather_index->numel() : a.size(0);
  check_index(gather_index, "gather_index", rows, a.size(0), op);
  check_index(scatter_index, "scatter_index", rows, num_out_rows, op);
  TORCH_CHECK(scatter_index || num_out_rows == rows, op, ": without scatter_index, num_out_rows must be the row count ", rows,
              ", got ", num_out_rows);
  if (scatter_scale) {
    TORCH_CHECK(scatter_scale->dim() == 1 && scatter_scale->numel() == rows && scatter_scale->is_floating_point(), op,
                ": scatter_scale must be a float (", rows, ",) tensor, got ", scatter_scale->sizes(), " ",
                scatter_scale->scalar_type());
  }
  const std::vector<WorkItem> items = plan_work(expert_offsets, num_experts, rows, op);
  const int64_t active_rows = items.empty() ? 0 : items.back().first_row + items.back().rows;

  const bool keep_preact = save_preact && activation != 0;
  // Rows that no active row writes must read zero: all of them when scattering, else the padding.
  at::Tensor out = scatter_index ? at::zeros({num_out_rows, out_features}, a.options())
                                 : at::empty({num_out_rows, out_features}, a.options());
  if (!scatter_index) out.narrow(0, active_rows, rows - active_rows).zero_();
  at::Tensor preact = at::empty({keep_preact ? rows : 0, out_features}, a.options());
  if (keep_preact) preact.narrow(0, active_rows, rows - active_rows).zero_();
  if (items.empty() || out_features == 0) return {out, preact};

  const at::Tensor weights = weight.detach().contiguous();
  const at::Tensor scale = scatter_scale ? scatter_scale->to(at::kFloat).contiguous() : at::Tensor();
  const c10::string_view approximate = activation == 2 ? "tanh" : "none";
  // Low precision: the epilogue (GELU, scale) runs in fp32 on the GEMM's output block.
  const bool low_precision = a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16;
  // The GEMM can write straight into `out` when nothing has to happen to its rows afterwards.
  const bool direct = !scatter_index && activation == 0 && !scatter_scale;

  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const WorkItem& item = items[w];
      const at::Tensor block = sorted_rows(a, gather_index, item.first_row, item.rows);
      const at::Tensor w_e = transpose_weight ? weights[item.expert].t() : weights[item.expert];
      if (direct) {
        at::Tensor target = out.narrow(0, item.first_row, item.rows);
        if (bias) at::addmm_out(target, (*bias)[item.expert], block, w_e);
        else at::mm_out(target, block, w_e);
        continue;
      }
      at::Tensor pre = bias ? at::addmm((*bias)[item.expert], block, w_e) : at::mm(block, w_e);
      if (keep_preact) preact.narrow(0, item.first_row, item.rows).copy_(pre);
      at::Tensor y = low_precision && (activation != 0 || scatter_scale) ? pre.to(at::kFloat) : pre;
      if (activation != 0) y = at::gelu_(y, approximate);
      if (scatter_scale) y.mul_(scale.narrow(0, item.first_row, item.rows).unsqueeze(1));
      if (scatter_index) out.index_copy_(0, scatter_index->narrow(0, item.first_row, item.rows), y.to(a.scalar_type()));
      else out.narrow(0, item.first_row, item.rows).copy_(y);
    }
  });
  return {out, preact};
}

std::tuple<at::Tensor, at::Tensor> grouped_weight_grad_cpu(const at::Tensor& a_in, const at::Tensor& grad_in,
                                                           const at::Tensor& expert_offsets,
                                                           const c10::optional<at::Tensor>& a_index,
                                                           const c10::optional<at::Tensor>& grad_index, bool compute_bias) {
  const char* op = "sm4.grouped_weight_grad";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor a = a_in.detach(), grad = grad_in.detach();
  TORCH_CHECK(a.dim() == 2 && grad.dim() == 2, op, ": need a (rows, K) and grad (rows, N), got ", a.sizes(), " and ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == a.scalar_type(), op, ": grad must have a's dtype ", a.scalar_type(), ", got ",
              grad.scalar_type());
  const int64_t rows = a_index ? a_index->numel() : a.size(0);
  check_index(a_index, "a_index", rows, a.size(0), op);
  check_index(grad_index, "grad_index", rows, grad.size(0), op);
  TORCH_CHECK(grad_index || grad.size(0) == rows, op, ": grad has ", grad.size(0), " rows, expected ", rows);
  const int64_t num_experts = expert_offsets.numel() - 1;
  TORCH_CHECK(num_experts >= 1, op, ": expert_offsets must have E + 1 >= 2 entries, got ", expert_offsets.numel());
  plan_work(expert_offsets, num_experts, rows, op);  // validates the offsets
  const int64_t in_features = a.size(1), out_features = grad.size(1);
  at::Tensor grad_weight = at::empty({num_experts, in_features, out_features}, a.options());
  at::Tensor grad_bias = at::empty({compute_bias ? num_experts : 0, out_features}, a.options());
  const int64_t* offset = expert_offsets.contiguous().data_ptr<int64_t>();
  // One expert per task: each writes only its own slice, in a fixed order (deterministic).
  at::parallel_for(0, num_experts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const int64_t first = offset[e], count = offset[e + 1] - offset[e];
      at::Tensor dw = grad_weight[e];
      if (count == 0) {
        dw.zero_();
        if (compute_bias) grad_bias[e].zero_();
        continue;
      }
      const at::Tensor g = sorted_rows(grad, grad_index, first, count);
      at::mm_out(dw, sorted_rows(a, a_index, first, count).t(), g);
      if (compute_bias) {
        at::Tensor db = grad_bias[e];
        at::sum_out(db, g, 0, false, a.scalar_type());
      }
    }
  });
  return {grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(sm4, CPU, m) {
  m.impl("grouped_mm", &grouped_mm_cpu);
  m.impl("grouped_weight_grad", &grouped_weight_grad_cpu);
}

}  // namespace sm4
