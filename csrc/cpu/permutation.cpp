// CPU kernels of token permutation: routing metadata (a stable counting sort), permute (gather to
// expert order) and unpermute (weighted combine back), with their backwards.
//
// Every reduction is a gather over a fixed order (a token's ranks), never a scatter-add, so all
// results are deterministic and need no atomics. All indices and offsets are int64.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "index_checks.h"

namespace sm4 {
namespace {

// Assignments per block of the counting sort: each block counts, then scatters, its own range.
constexpr int64_t kSortBlock = 16384;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> routing_metadata_cpu(
    const at::Tensor& expert_ids, int64_t num_experts) {
  check_expert_ids(expert_ids, num_experts, "sm4.routing_metadata");
  const at::Tensor ids = expert_ids.to(at::kLong).contiguous();
  const int64_t tokens = ids.size(0), k = ids.size(1), n = ids.numel();
  const int64_t bins = num_experts + 1;  // bin E: inactive assignments (padding rows)
  const auto options = ids.options();
  at::Tensor counts = at::empty({num_experts}, options), offsets = at::empty({num_experts + 1}, options);
  at::Tensor sorted_assignment = at::empty({n}, options), sorted_token = at::empty({n}, options);
  at::Tensor assignment_row = at::empty({tokens, k}, options);
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t num_blocks = std::max<int64_t>((n + kSortBlock - 1) / kSortBlock, 1);
  std::vector<int64_t> block_counts(num_blocks * bins, 0);

  auto bin_of = [&](int64_t i) {
    const int64_t e = id[i];
    TORCH_CHECK_VALUE(e >= -1 && e < num_experts, "sm4.routing_metadata: expert_ids must lie in [-1, ", num_experts,
                "), but flat entry ", i, " is ", e);
    return e < 0 ? num_experts : e;
  };
  at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t i = b * kSortBlock; i < std::min(n, (b + 1) * kSortBlock); ++i) ++block_counts[b * bins + bin_of(i)];
  });
  // Row where each (block, bin) starts: bins in order, and within a bin, blocks in order (stable).
  std::vector<int64_t> block_start(num_blocks * bins);
  int64_t row = 0;
  int64_t* offset = offsets.data_ptr<int64_t>();
  for (int64_t e = 0; e < bins; ++e) {
    if (e < num_experts) offset[e] = row;
    for (int64_t b = 0; b < num_blocks; ++b) {
      block_start[b * bins + e] = row;
      row += block_counts[b * bins + e];
    }
  }
  int64_t active = 0;
  for (int64_t b = 0; b < num_blocks; ++b)
    for (int64_t e = 0; e < num_experts; ++e) active += block_counts[b * bins + e];
  offset[num_experts] = active;
  int64_t* count = counts.data_ptr<int64_t>();
  for (int64_t e = 0; e < num_experts; ++e) count[e] = offset[e + 1] - offset[e];

  int64_t* order = sorted_assignment.data_ptr<int64_t>();
  int64_t* token_of_row = sorted_token.data_ptr<int64_t>();
  int64_t* row_of = assignment_row.data_ptr<int64_t>();
  at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* next = block_start.data() + b * bins;
      for (int64_t i = b * kSortBlock; i < std::min(n, (b + 1) * kSortBlock); ++i) {
        const int64_t e = id[i] < 0 ? num_experts : id[i];
        const int64_t r = next[e]++;
        order[r] = i;
        token_of_row[r] = i / k;
        row_of[i] = e < num_experts ? r : -1;
      }
    }
  });
  return {counts, offsets, sorted_assignment, sorted_token, assignment_row};
}

// assignment_row: (T, k) int64 row indices in [-1, bound) (-1: no row), checked before any row
// is read or written, returned contiguous.
at::Tensor checked_rows(const at::Tensor& assignment_row, int64_t bound, const char* op) {
  check_shape(assignment_row, {-1, -1}, op, "assignment_row", "(T, k)");
  return checked_index(assignment_row, -1, bound, op, "assignment_row");
}

at::Tensor permute_cpu(const at::Tensor& x, const at::Tensor& assignment_row, const at::Tensor& expert_offsets) {
  const char* op = "sm4.permute";
  check_shape(x, {-1, -1}, op, "x", "(T, d)");
  check_floating(x, op, "x");
  check_shape(assignment_row, {x.size(0), -1}, op, "assignment_row", "(T, k)");
  const at::Tensor xc = x.contiguous();
  const int64_t tokens = assignment_row.size(0), k = assignment_row.size(1), dim = x.size(1), n = tokens * k;
  check_offsets(expert_offsets, -1, n, op);
  // CPU tensor: no sync. The active rows are [0, active): a row past them would be zeroed below.
  const int64_t active = expert_offsets[expert_offsets.numel() - 1].item<int64_t>();
  const at::Tensor rows = checked_rows(assignment_row, active, op);
  at::Tensor out = at::empty({n, dim}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "permute_cpu", [&] {
    const scalar_t* src = xc.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t* row = rows.data_ptr<int64_t>();
    // Every active row is written by exactly one (t, r); the padding rows are zeroed.
    at::parallel_for(0, tokens, 64, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t r = 0; r < k; ++r) {
          const int64_t i = row[t * k + r];
          if (i >= 0) std::copy(src + t * dim, src + (t + 1) * dim, dst + i * dim);
        }
    });
    std::fill(dst + active * dim, dst + n * dim, scalar_t(0));
  });
  return out;
}

// out[t] = sum over t's active ranks r of (weight[t, r] or 1) * src[row[t, r]], accumulated in
// the op-math type in rank order (deterministic). Shared by unpermute and permute's backward.
at::Tensor combine_rows(const at::Tensor& src_rows, const char* rows_name, const at::Tensor* weights,
                        const at::Tensor& assignment_row, const char* op) {
  check_shape(src_rows, {-1, -1}, op, rows_name, "(N, d)");
  check_floating(src_rows, op, rows_name);
  const at::Tensor src = src_rows.contiguous(), rows = checked_rows(assignment_row, src_rows.size(0), op);
  const int64_t tokens = rows.size(0), k = rows.size(1), dim = src.size(1);
  at::Tensor out = at::empty({tokens, dim}, src.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "combine_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor w = weights ? weights->to(c10::CppTypeToScalarType<acc_t>::value).contiguous() : at::Tensor();
    const acc_t* weight = weights ? w.data_ptr<acc_t>() : nullptr;
    const scalar_t* in = src.data_ptr<scalar_t>();
    const int64_t* row = rows.data_ptr<int64_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, 64, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> acc(dim);
      for (int64_t t = t0; t < t1; ++t) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t r = 0; r < k; ++r) {
          const int64_t i = row[t * k + r];
          if (i < 0) continue;  // inactive: contributes nothing (not 0 * value, which spreads NaN)
          const acc_t scale = weight ? weight[t * k + r] : acc_t(1);
          for (int64_t c = 0; c < dim; ++c) acc[c] += scale * static_cast<acc_t>(in[i * dim + c]);
        }
        for (int64_t c = 0; c < dim; ++c) dst[t * dim + c] = static_cast<scalar_t>(acc[c]);
      }
    });
  });
  return out;
}

at::Tensor permute_backward_cpu(const at::Tensor& grad_sorted, const at::Tensor& assignment_row) {
  return combine_rows(grad_sorted, "grad_sorted", nullptr, assignment_row, "sm4.permute_backward");
}

at::Tensor unpermute_cpu(const at::Tensor& y_sorted, const at::Tensor& gates, const at::Tensor& assignment_row) {
  const char* op = "sm4.unpermute";
  check_shape(assignment_row, {-1, -1}, op, "assignment_row", "(T, k)");
  check_shape(gates, {assignment_row.size(0), assignment_row.size(1)}, op, "gates", "(T, k), as assignment_row");
  check_floating(gates, op, "gates");
  return combine_rows(y_sorted, "y_sorted", &gates, assignment_row, op);
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(const at::Tensor& grad_y, const at::Tensor& y_sorted,
                                                          const at::Tensor& gates, const at::Tensor& assignment_row) {
  const char* op = "sm4.unpermute_backward";
  check_shape(y_sorted, {-1, -1}, op, "y_sorted", "(N, d)");
  check_floating(y_sorted, op, "y_sorted");
  check_shape(assignment_row, {-1, -1}, op, "assignment_row", "(T, k)");
  const int64_t t_rows = assignment_row.size(0), t_ranks = assignment_row.size(1);
  check_shape(grad_y, {t_rows, y_sorted.size(1)}, op, "grad_y", "(T, d), T from assignment_row, d from y_sorted");
  check_dtype(grad_y, y_sorted.scalar_type(), op, "grad_y");
  check_shape(gates, {t_rows, t_ranks}, op, "gates", "(T, k), as assignment_row");
  check_floating(gates, op, "gates");
  const at::Tensor gy = grad_y.contiguous(), y = y_sorted.contiguous();
  const at::Tensor rows = checked_rows(assignment_row, y_sorted.size(0), op);
  const int64_t tokens = rows.size(0), k = rows.size(1), dim = y.size(1), n = y.size(0);
  // Every active row is written once below; only the padding rows (the last N - A) need zeros.
  at::Tensor grad_sorted = at::empty({n, dim}, y.options());
  // CPU tensor: no device sync. At most n: a direct call may give fewer rows than T * k.
  const int64_t active = std::min((rows >= 0).sum().item<int64_t>(), n);
  grad_sorted.narrow(0, active, n - active).zero_();
  at::Tensor grad_gates = at::zeros({tokens, k}, gates.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "unpermute_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor g = gates.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    at::Tensor dg = at::zeros({tokens, k}, g.options());
    const scalar_t* gyp = gy.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const acc_t* gate = g.data_ptr<acc_t>();
    const int64_t* row = rows.data_ptr<int64_t>();
    scalar_t* gs = grad_sorted.data_ptr<scalar_t>();
    acc_t* dgp = dg.data_ptr<acc_t>();
    // Each active row belongs to exactly one (t, r): the writes below never collide.
    at::parallel_for(0, tokens, 64, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t r = 0; r < k; ++r) {
          const int64_t i = row[t * k + r];
          if (i < 0) continue;
          const acc_t w = gate[t * k + r];
          acc_t dot = 0;
          for (int64_t c = 0; c < dim; ++c) {
            const acc_t go = static_cast<acc_t>(gyp[t * dim + c]);
            gs[i * dim + c] = static_cast<scalar_t>(w * go);
            dot += go * static_cast<acc_t>(yp[i * dim + c]);
          }
          dgp[t * k + r] = dot;
        }
      }
    });
    grad_gates.copy_(dg);
  });
  return {grad_sorted, grad_gates};
}

}  // namespace

TORCH_LIBRARY_IMPL(sm4, CPU, m) {
  m.impl("routing_metadata", &routing_metadata_cpu);
  m.impl("permute", &permute_cpu);
  m.impl("permute_backward", &permute_backward_cpu);
  m.impl("unpermute", &unpermute_cpu);
  m.impl("unpermute_backward", &unpermute_backward_cpu);
}

}  // namespace sm4
