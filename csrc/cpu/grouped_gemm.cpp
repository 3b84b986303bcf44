// CPU kernels of the grouped expert GEMMs: grouped_mm (forward and input gradient, with gather,
// bias, GELU, gate scale and scatter fused around the GEMM) and grouped_weight_grad.
// Contract: csrc/sm4_ops.cpp; ground truth: sm4/reference.py grouped_mm / grouped_weight_grad.
//
// Technique: the work is cut into (expert, row block) items, run in parallel; each item gathers
// its rows (when there is a gather index) into a contiguous block and multiplies it by the
// expert's weight: fp32 calls the BLAS torch links (MKL) directly on raw pointers (blas_gemm.h;
// at::mm's dispatch and views cost as much as a 48-row expert GEMM) and adds the bias in a loop;
// fp16/bf16 call at::addmm with the bias folded in. Without scatter the GEMM writes straight into
// the output rows and each thread runs the GELU once over all the rows it wrote; with scatter the
// epilogue (GELU, gate scale, scatter) runs on the block while it is still in cache. The fp32
// GELU is csrc/cpu/gelu_fp32.h's (AVX2 + FMA, the pre-activation copy in the same pass). The offsets
// are read directly: on CPU tensors that is a memory read, not a device sync. Low-precision inputs
// (fp16/bf16) go through the library GEMM in their own dtype (fp32 accumulation, one rounding) and
// torch's GELU (fp32 inside), so they round as plain PyTorch does, at most once per step.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <cstring>
#include <torch/library.h>
#include <type_traits>

#include <vector>

#include "../checks.h"
#include "index_checks.h"
#include "blas_gemm.h"
#include "gelu_fp32.h"

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
  check_offsets(expert_offsets, num_experts, num_rows, op);
  const at::Tensor offsets = expert_offsets.contiguous();
  const int64_t* offset = offsets.data_ptr<int64_t>();
  std::vector<WorkItem> items;
  for (int64_t e = 0; e < num_experts; ++e) {
    for (int64_t row = offset[e]; row < offset[e + 1]; row += kRowBlock)
      items.push_back({e, row, std::min(kRowBlock, offset[e + 1] - row)});
  }
  return items;
}

// Rows [first, first + count) of the sorted order as a contiguous (count, width) block: a view
// when there is no index, else a copy into `buffer` (row memcpys, no at:: op per row block).
at::Tensor sorted_rows(const at::Tensor& source, const c10::optional<at::Tensor>& index, int64_t first, int64_t count,
                       at::Tensor& buffer) {
  if (!index) return source.narrow(0, first, count);
  const int64_t width = source.size(1), bytes = width * source.element_size();
  if (buffer.size(0) < count) buffer = at::empty({count, width}, source.options());
  const char* src = static_cast<const char*>(source.data_ptr());
  char* dst = static_cast<char*>(buffer.data_ptr());
  const int64_t* row = index->data_ptr<int64_t>() + first;
  for (int64_t i = 0; i < count; ++i) std::memcpy(dst + i * bytes, src + row[i] * bytes, bytes);
  return buffer.narrow(0, 0, count);
}

// Rows [first, first + count) of a row-major (rows, width) fp32 array in sorted order: the rows
// themselves when there is no index, else copied through the index into `buffer`.
const float* gathered_rows(const float* source, const int64_t* index, int64_t first, int64_t count, int64_t width,
                           std::vector<float>& buffer) {
  if (!index) return source + first * width;
  if (static_cast<int64_t>(buffer.size()) < count * width) buffer.resize(count * width);
  for (int64_t i = 0; i < count; ++i) std::memcpy(buffer.data() + i * width, source + index[i + first] * width, width * sizeof(float));
  return buffer.data();
}

void check_index(const c10::optional<at::Tensor>& index, const char* name, int64_t rows, int64_t bound, const char* op) {
  if (!index) return;
  check_shape(*index, {rows}, op, name, "(M,), M the sorted rows");
  checked_index(*index, 0, bound, op, name);
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_cpu(const at::Tensor& a_in, const at::Tensor& weight,
                                                  const c10::optional<at::Tensor>& bias_in, const at::Tensor& expert_offsets,
                                                  const c10::optional<at::Tensor>& gather_index,
                                                  const c10::optional<at::Tensor>& scatter_index,
                                                  const c10::optional<at::Tensor>& scatter_scale, int64_t num_out_rows,
                                                  bool transpose_weight, int64_t activation, bool save_preact) {
  const char* op = "sm4.grouped_mm";
  // The at:: calls below are this kernel's internals (see KernelScope). The guard covers this
  // thread; at::parallel_for's workers do not inherit it, hence also the detach()es.
  const KernelScope scope;
  const at::Tensor a = a_in.detach();
  const c10::optional<at::Tensor> bias = bias_in ? c10::optional<at::Tensor>(bias_in->detach()) : c10::nullopt;
  check_shape(a, {-1, -1}, op, "a", "(rows, K)");
  check_floating(a, op, "a");
  check_shape(weight, {-1, -1, -1}, op, "weight", "(E, K, N) (or (E, N, K) transposed)");
  check_dtype(weight, a.scalar_type(), op, "weight (a's dtype)");
  TORCH_CHECK_VALUE(activation >= 0 && activation <= 2, op, ": activation must be 0 (none), 1 (gelu) or 2 (gelu_tanh), got ",
                    activation);
  TORCH_CHECK_VALUE(num_out_rows >= 0, op, ": num_out_rows must be >= 0, got ", num_out_rows);
  const int64_t num_experts = weight.size(0);
  const int64_t in_features = transpose_weight ? weight.size(2) : weight.size(1);
  const int64_t out_features = transpose_weight ? weight.size(1) : weight.size(2);
  TORCH_CHECK_VALUE(a.size(1) == in_features, op, ": a must have the weight's K = ", in_features, " features, got ",
                    a.size(1));
  if (bias) {
    check_shape(*bias, {num_experts, out_features}, op, "bias", "(E, N)");
    check_dtype(*bias, a.scalar_type(), op, "bias (a's dtype)");
  }
  const int64_t rows = gather_index ? gather_index->numel() : a.size(0);
  check_index(gather_index, "gather_index", rows, a.size(0), op);
  check_index(scatter_index, "scatter_index", rows, num_out_rows, op);
  TORCH_CHECK_VALUE(scatter_index || num_out_rows == rows, op,
                    ": without scatter_index, num_out_rows must be the row count ", rows, ", got ", num_out_rows);
  if (scatter_scale) {
    check_shape(*scatter_scale, {rows}, op, "scatter_scale", "(M,), M the sorted rows");
    check_floating(*scatter_scale, op, "scatter_scale");
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
  const at::Tensor bias_rows = bias ? bias->contiguous() : at::Tensor();
  const at::Tensor a_rows = a.contiguous();
  const at::Tensor gather = gather_index ? gather_index->contiguous() : at::Tensor();
  const at::Tensor scatter = scatter_index ? scatter_index->contiguous() : at::Tensor();
  const at::Tensor scale = scatter_scale ? scatter_scale->to(at::kFloat).contiguous() : at::Tensor();
  const c10::string_view approximate = activation == 2 ? "tanh" : "none";
  // Without scatter and scale, the GEMM writes straight into out's rows, and each thread then runs
  // the pre-activation copy and the GELU once over all the rows it wrote (one at::gelu_ over a
  // thread's rows instead of one per expert block: a small at::gelu_ costs ~10 us of set-up).
  const bool in_place = !scatter_index && !scatter_scale;
  // fp32: the BLAS directly on raw pointers (see blas_gemm.h); other dtypes: at::addmm / at::mm,
  // which round fp16/bf16 once, with the bias folded in, as plain PyTorch does.
  const bool use_blas = a.scalar_type() == at::kFloat &&
                        blas::available(std::max({rows, in_features, out_features, num_out_rows}));
  const int64_t weight_ld = transpose_weight ? in_features : out_features;
  std::vector<at::Tensor> expert_weight, expert_bias;
  if (!use_blas) {  // per-expert views, made once (a view costs as much as a small GEMM's bookkeeping)
    expert_weight.resize(num_experts);
    expert_bias.resize(bias ? num_experts : 0);
    for (int64_t e = 0; e < num_experts; ++e) {
      expert_weight[e] = transpose_weight ? weights[e].t() : weights[e];
      if (bias) expert_bias[e] = bias_rows[e];
    }
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "grouped_mm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t n = out_features, width = in_features;
    const scalar_t* a_data = a_rows.data_ptr<scalar_t>();
    const int64_t* gather_row = gather_index ? gather.data_ptr<int64_t>() : nullptr;
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
      // Per-thread workspaces, reused across this thread's items.
      at::Tensor gathered = at::empty({gather_index ? kRowBlock : 0, width}, a.options());
      at::Tensor product = at::empty({in_place ? 0 : kRowBlock, n}, a.options());
      for (int64_t w = begin; w < end; ++w) {
        const WorkItem& item = items[w];
        const int64_t m = item.rows;
        // The block's input rows, contiguous: gathered by row memcpys, or a slice of a.
        const scalar_t* block = a_data + item.first_row * width;
        if (gather_row) {
          scalar_t* dst = gathered.data_ptr<scalar_t>();
          for (int64_t i = 0; i < m; ++i)
            std::memcpy(dst + i * width, a_data + gather_row[item.first_row + i] * width, width * sizeof(scalar_t));
          block = dst;
        }
        scalar_t* y_data = in_place ? out.data_ptr<scalar_t>() + item.first_row * n : product.data_ptr<scalar_t>();
        if (use_blas) {
          const float* w_data = reinterpret_cast<const float*>(weights.data_ptr<scalar_t>()) + item.expert * width * n;
          float* y = reinterpret_cast<float*>(y_data);
          blas::gemm_rows(transpose_weight, m, n, width, reinterpret_cast<const float*>(block), width, w_data, weight_ld,
                          0.0f, y, n);
          if (bias) {
            const float* b = reinterpret_cast<const float*>(bias_rows.data_ptr<scalar_t>()) + item.expert * n;
            for (int64_t i = 0; i < m; ++i)
              for (int64_t j = 0; j < n; ++j) y[i * n + j] += b[j];
          }
        } else {
          const at::Tensor block_rows = gather_row ? gathered.narrow(0, 0, m) : a_rows.narrow(0, item.first_row, m);
          at::Tensor y = in_place ? out.narrow(0, item.first_row, m) : product.narrow(0, 0, m);
          if (bias) at::addmm_out(y, expert_bias[item.expert], block_rows, expert_weight[item.expert]);
          else at::mm_out(y, block_rows, expert_weight[item.expert]);
        }
        if (in_place) continue;  // activation: below, once over the thread's rows
        if (activation != 0) {
          if constexpr (std::is_same_v<scalar_t, float>) {  // one pass: pre-activation copy and GELU
            // (the dispatch lambda is no template: the cast only compiles the other dtypes' branch)
            gelu::gelu_rows(reinterpret_cast<float*>(y_data), keep_preact ? preact.data_ptr<float>() + item.first_row * n : nullptr, m * n,
                            activation == 2);
          } else {
            at::Tensor y = product.narrow(0, 0, m);
            if (keep_preact) preact.narrow(0, item.first_row, m).copy_(y);
            at::gelu_(y, approximate);  // vectorised, computes in fp32
          }
        }
        // Epilogue: gate scale (in fp32) and scatter of the rows to their places.
        const float* gate = scatter_scale ? scale.data_ptr<float>() + item.first_row : nullptr;
        const int64_t* target = scatter_index ? scatter.data_ptr<int64_t>() + item.first_row : nullptr;
        scalar_t* dst = out.data_ptr<scalar_t>();
        for (int64_t i = 0; i < m; ++i) {
          scalar_t* row = dst + (target ? target[i] : item.first_row + i) * n;
          if (!gate) {
            std::memcpy(row, y_data + i * n, n * sizeof(scalar_t));
            continue;
          }
          const acc_t factor = static_cast<acc_t>(gate[i]);
          for (int64_t j = 0; j < n; ++j) row[j] = static_cast<scalar_t>(static_cast<acc_t>(y_data[i * n + j]) * factor);
        }
      }
      if (in_place && activation != 0 && begin < end) {
        // This thread's items cover the contiguous rows [first, last) of out.
        const int64_t first = items[begin].first_row, last = items[end - 1].first_row + items[end - 1].rows;
        if constexpr (std::is_same_v<scalar_t, float>) {  // fp32: gelu_fp32.h, no at:: set-up, one pass
          gelu::gelu_rows(out.data_ptr<float>() + first * n, keep_preact ? preact.data_ptr<float>() + first * n : nullptr,
                          (last - first) * n, activation == 2);
        } else {
          at::Tensor y = out.narrow(0, first, last - first);
          if (keep_preact) preact.narrow(0, first, last - first).copy_(y);
          at::gelu_(y, approximate);
        }
      }
    });
  });
  return {out, preact};
}

std::tuple<at::Tensor, at::Tensor> grouped_weight_grad_cpu(const at::Tensor& a_in, const at::Tensor& grad_in,
                                                           const at::Tensor& expert_offsets,
                                                           const c10::optional<at::Tensor>& a_index,
                                                           const c10::optional<at::Tensor>& grad_index, bool compute_bias) {
  const char* op = "sm4.grouped_weight_grad";
  const KernelScope scope;
  const at::Tensor a = a_in.detach(), grad = grad_in.detach();
  check_shape(a, {-1, -1}, op, "a", "(rows, K)");
  check_floating(a, op, "a");
  check_shape(grad, {-1, -1}, op, "grad", "(rows, N)");
  check_dtype(grad, a.scalar_type(), op, "grad (a's dtype)");
  const int64_t rows = a_index ? a_index->numel() : a.size(0);
  check_index(a_index, "a_index", rows, a.size(0), op);
  check_index(grad_index, "grad_index", rows, grad.size(0), op);
  TORCH_CHECK_VALUE(grad_index || grad.size(0) == rows, op, ": without grad_index, grad must have ", rows,
                    " rows (a's or a_index's), got ", grad.size(0));
  const int64_t num_experts = expert_offsets.numel() - 1;
  TORCH_CHECK_VALUE(num_experts >= 1, op, ": expert_offsets must have E + 1 >= 2 entries, got shape ", expert_offsets.sizes());
  plan_work(expert_offsets, num_experts, rows, op);  // validates the offsets
  const int64_t in_features = a.size(1), out_features = grad.size(1);
  at::Tensor grad_weight = at::empty({num_experts, in_features, out_features}, a.options());
  at::Tensor grad_bias = at::empty({compute_bias ? num_experts : 0, out_features}, a.options());
  const at::Tensor offsets = expert_offsets.contiguous();
  const int64_t* offset = offsets.data_ptr<int64_t>();
  const at::Tensor a_rows = a.contiguous(), grad_rows = grad.contiguous();
  const c10::optional<at::Tensor> a_idx = a_index ? c10::optional<at::Tensor>(a_index->contiguous()) : c10::nullopt;
  const c10::optional<at::Tensor> g_idx = grad_index ? c10::optional<at::Tensor>(grad_index->contiguous()) : c10::nullopt;
  // Rows per GEMM of one expert: bounds the gather buffers; chunks accumulate in a fixed order.
  constexpr int64_t kChunk = 8 * kRowBlock;
  const bool use_blas = a.scalar_type() == at::kFloat && blas::available(std::max({kChunk, in_features, out_features}));
  if (use_blas) {
    // fp32: raw pointers and per-thread gather buffers, no tensor view per expert or chunk (at
    // the papers' shapes those ~30 views and allocations a call cost about as much as the GEMMs).
    // Same BLAS calls and the same bias order as the generic path below: the same bits.
    const float* a_data = a_rows.data_ptr<float>();
    const float* g_data = grad_rows.data_ptr<float>();
    const int64_t* a_row = a_idx ? a_idx->data_ptr<int64_t>() : nullptr;
    const int64_t* g_row = g_idx ? g_idx->data_ptr<int64_t>() : nullptr;
    float* dw_data = grad_weight.data_ptr<float>();
    float* db_data = compute_bias ? grad_bias.data_ptr<float>() : nullptr;
    at::parallel_for(0, num_experts, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> a_buffer, g_buffer, bias_sum(out_features);
      for (int64_t e = begin; e < end; ++e) {
        const int64_t first = offset[e], count = offset[e + 1] - offset[e];
        float* dw = dw_data + e * in_features * out_features;
        if (count == 0) std::memset(dw, 0, in_features * out_features * sizeof(float));
        std::fill(bias_sum.begin(), bias_sum.end(), 0.0f);
        for (int64_t chunk = 0; chunk < count; chunk += kChunk) {
          const int64_t m = std::min(kChunk, count - chunk);
          const float* g = gathered_rows(g_data, g_row, first + chunk, m, out_features, g_buffer);
          const float* x = gathered_rows(a_data, a_row, first + chunk, m, in_features, a_buffer);
          blas::gemm_at_b(m, in_features, out_features, x, in_features, g, out_features, chunk == 0 ? 0.0f : 1.0f, dw);
          if (compute_bias)
            for (int64_t i = 0; i < m; ++i)
              for (int64_t j = 0; j < out_features; ++j) bias_sum[j] += g[i * out_features + j];
        }
        if (compute_bias) std::copy(bias_sum.begin(), bias_sum.end(), db_data + e * out_features);
      }
    });
    return {grad_weight, grad_bias};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "grouped_weight_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // fp16/bf16 (or no BLAS): one expert per task, each writes only its own slice (deterministic).
    at::parallel_for(0, num_experts, 1, [&](int64_t begin, int64_t end) {
      at::Tensor a_buffer = at::empty({0, in_features}, a.options()), g_buffer = at::empty({0, out_features}, a.options());
      std::vector<acc_t> bias_sum(out_features);
      for (int64_t e = begin; e < end; ++e) {
        const int64_t first = offset[e], count = offset[e + 1] - offset[e];
        at::Tensor dw = grad_weight[e];
        if (count == 0) dw.zero_();
        std::fill(bias_sum.begin(), bias_sum.end(), acc_t(0));
        for (int64_t chunk = 0; chunk < count; chunk += kChunk) {
          const int64_t m = std::min(kChunk, count - chunk);
          const at::Tensor g = sorted_rows(grad_rows, g_idx, first + chunk, m, g_buffer);
          const at::Tensor x = sorted_rows(a_rows, a_idx, first + chunk, m, a_buffer);
          if (chunk == 0) {
            at::mm_out(dw, x.t(), g);
          } else {
            dw.addmm_(x.t(), g);
          }
          if (compute_bias) {
            const scalar_t* gp = g.data_ptr<scalar_t>();
            for (int64_t i = 0; i < m; ++i)
              for (int64_t j = 0; j < out_features; ++j) bias_sum[j] += static_cast<acc_t>(gp[i * out_features + j]);
          }
        }
        if (compute_bias) {
          scalar_t* db = grad_bias.data_ptr<scalar_t>() + e * out_features;
          for (int64_t j = 0; j < out_features; ++j) db[j] = static_cast<scalar_t>(bias_sum[j]);
        }
      }
    });
  });
  return {grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(sm4, CPU, m) {
  m.impl("grouped_mm", &grouped_mm_cpu);
  m.impl("grouped_weight_grad", &grouped_weight_grad_cpu);
}

}  // namespace sm4
