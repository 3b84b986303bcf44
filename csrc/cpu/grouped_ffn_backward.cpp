// CPU kernel of the fused fp32 FFN-expert backward (sm4::grouped_ffn_backward; contract in
// csrc/sm4_ops.cpp, ground truth: autograd of sm4/reference.py grouped_mm twice with GELU between).
//
// Why fused: the layered backward (sm4/grouped.py) makes five passes over the N x h hidden layer
// (recompute GELU, the dH GEMM, gelu_backward, and the two weight gradients read dH / H again),
// gathers dY twice, and pays at:: set-up per call. Here each expert's rows are cut into tiles of
// kTile rows, and one pass per tile, on one thread, does everything while the tile is in cache:
//   G  = dY rows of the tile (gathered once, through scatter_index)
//   dH = G @ W2^T; epilogue from the saved pre-activation P: H = gelu(P), dP = gelu'(P) * dH
//        (one exp per element, csrc/cpu/gelu_fp32.h)
//   dW2 += H^T G, db2 += colsum G, dW1 += X^T dP, db1 += colsum dP, dA = dP @ W1^T
// The GEMMs call the BLAS torch links on raw pointers (blas_gemm.h), single-threaded inside the
// parallel region.
//
// Parallelism and determinism: the work items are the experts (their tiles run in order on one
// thread, so dW / db accumulate in a fixed order without per-tile partial weight copies, which at
// the scale-up shapes would cost E x tiles x d x h floats), handed out largest first from an
// atomic counter (dynamic, so one big expert does not leave the other thread idle behind a static
// split). dX: dA rows land in sorted order and a second parallel pass sums each x row's dA rows
// (gather_index's inverse, built by a counting sort) in increasing sorted-row order. So every
// result is independent of the thread count and bitwise repeatable.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <numeric>
#include <vector>

#include "../checks.h"
#include "blas_gemm.h"
#include "gelu_fp32.h"
#include "index_checks.h"

namespace sm4 {
namespace {

// Rows per tile: the tile's G, dP, H and X (256 x (2h + d_in + d_out) floats: 384 KiB at the
// papers' h = 128, d = 64) stay in L2; fewer rows would re-read the expert's weights more often.
constexpr int64_t kTile = 256;

// C (m x n, row stride ldc) = A (m x k) @ B^T, B stored (n x k): the dH and dA products. A zero
// inner extent k (h = 0) gives C = 0 without asking the BLAS to handle k = 0.
void gemm_abt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
              int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    return;
  }
  if (blas::available(std::max({m, n, k}))) {
    blas::gemm_rows(true, m, n, k, a, lda, b, ldb, 0.0f, c, ldc);
    return;
  }
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::mm_out(out, at::from_blob(const_cast<float*>(a), {m, k}, {lda, 1}, opts),
             at::from_blob(const_cast<float*>(b), {n, k}, {ldb, 1}, opts).t());
}

// D (k x n, contiguous) = X^T G (+ D when accumulate), X (m x k), G (m x n): a weight gradient.
void gemm_atb(int64_t m, int64_t k, int64_t n, const float* x, int64_t ldx, const float* g, int64_t ldg, bool accumulate,
              float* d) {
  if (k == 0 || n == 0) return;
  if (m == 0) {
    if (!accumulate) std::fill(d, d + k * n, 0.0f);
    return;
  }
  if (blas::available(std::max({m, n, k}))) {
    blas::gemm_at_b(m, k, n, x, ldx, g, ldg, accumulate ? 1.0f : 0.0f, d);
    return;
  }
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor out = at::from_blob(d, {k, n}, opts);
  const at::Tensor xt = at::from_blob(const_cast<float*>(x), {m, k}, {ldx, 1}, opts).t();
  const at::Tensor gt = at::from_blob(const_cast<float*>(g), {m, n}, {ldg, 1}, opts);
  if (accumulate) out.addmm_(xt, gt);
  else at::mm_out(out, xt, gt);
}

// sum[j] += rows[i * n + j] over the m rows, in row order.
void add_column_sums(const float* rows, int64_t m, int64_t n, float* sum) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) sum[j] += rows[i * n + j];
}

// Copies rows index[0..m) of source (row width n) into dst, contiguous.
void gather_rows(const float* source, const int64_t* index, int64_t m, int64_t n, float* dst) {
  for (int64_t i = 0; i < m; ++i) std::memcpy(dst + i * n, source + index[i] * n, n * sizeof(float));
}

// A float workspace of at least n elements. Up to kKeptFloats it is kept per thread across calls
// (`kept`): the tile buffers and the sorted dA rows (a few hundred KiB at the papers' shapes) would
// otherwise be fresh pages on every call (glibc serves them by mmap), and those page faults cost
// about a tenth of the op (perf, medium shape). Larger ones (scale-up shapes, where the GEMMs
// dwarf the faults) live in `once` for this call only, so no thread keeps 100+ MiB.
constexpr int64_t kKeptFloats = int64_t(4) << 20;  // 16 MiB

float* workspace(std::vector<float>& kept, std::vector<float>& once, int64_t n) {
  std::vector<float>& buffer = n <= kKeptFloats ? kept : once;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

void check_fp32(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name,
                   " must be float32 (the fused FFN backward is fp32 only; other dtypes take the layered "
                   "backward), got ", t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_ffn_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& w1_in, const at::Tensor& w2_in,
    const at::Tensor& preact_in, const at::Tensor& expert_offsets, const c10::optional<at::Tensor>& gather_index,
    const c10::optional<at::Tensor>& scatter_index, int64_t activation, bool compute_grad_x, bool compute_bias1,
    bool compute_bias2) {
  const char* op = "sm4.grouped_ffn_backward";
  const KernelScope scope;
  const at::Tensor grad_out = grad_out_in.detach(), x = x_in.detach(), w1 = w1_in.detach(), w2 = w2_in.detach(),
                   preact = preact_in.detach();
  // ---- entry checks: everything the loops below dereference -------------------------------------
  check_shape(x, {-1, -1}, op, "x", "(T, d_in)");
  check_fp32(x, op, "x");
  check_shape(w1, {-1, x.size(1), -1}, op, "w1", "(E, d_in, h)");
  check_fp32(w1, op, "w1");
  const int64_t num_experts = w1.size(0), d_in = x.size(1), hidden = w1.size(2);
  check_shape(w2, {num_experts, hidden, -1}, op, "w2", "(E, h, d_out)");
  check_fp32(w2, op, "w2");
  const int64_t d_out = w2.size(2);
  check_shape(preact, {-1, hidden}, op, "preact", "(M, h)");
  check_fp32(preact, op, "preact");
  const int64_t rows = preact.size(0);
  check_shape(grad_out, {-1, d_out}, op, "grad_out", "(num_out_rows, d_out)");
  check_fp32(grad_out, op, "grad_out");
  TORCH_CHECK_VALUE(activation == 1 || activation == 2, op, ": activation must be 1 (gelu) or 2 (gelu_tanh), got ",
                    activation);
  if (gather_index) {
    check_shape(*gather_index, {rows}, op, "gather_index", "(M,), M the sorted rows (preact's)");
    checked_index(*gather_index, 0, x.size(0), op, "gather_index");
  } else {
    TORCH_CHECK_VALUE(x.size(0) == rows, op, ": without gather_index, x must have the ", rows,
                      " sorted rows of preact, got ", x.size(0));
  }
  if (scatter_index) {
    check_shape(*scatter_index, {rows}, op, "scatter_index", "(M,), M the sorted rows (preact's)");
    checked_index(*scatter_index, 0, grad_out.size(0), op, "scatter_index");
  } else {
    TORCH_CHECK_VALUE(grad_out.size(0) == rows, op, ": without scatter_index, grad_out must have the ", rows,
                      " sorted rows of preact, got ", grad_out.size(0));
  }
  check_offsets(expert_offsets, num_experts, rows, op);

  // ---- outputs ---------------------------------------------------------------------------------
  const auto opts = x.options();
  at::Tensor grad_x = at::zeros({compute_grad_x ? x.size(0) : 0, d_in}, opts);
  at::Tensor grad_w1 = at::empty({num_experts, d_in, hidden}, opts);
  at::Tensor grad_b1 = at::zeros({compute_bias1 ? num_experts : 0, hidden}, opts);
  at::Tensor grad_w2 = at::empty({num_experts, hidden, d_out}, opts);
  at::Tensor grad_b2 = at::zeros({compute_bias2 ? num_experts : 0, d_out}, opts);

  const at::Tensor offsets = expert_offsets.contiguous();
  const int64_t* offset = offsets.data_ptr<int64_t>();
  const int64_t active = offset[num_experts];
  const at::Tensor gy = grad_out.contiguous(), xs = x.contiguous(), w1s = w1.contiguous(), w2s = w2.contiguous(),
                   pre = preact.contiguous();
  const at::Tensor gather = gather_index ? gather_index->contiguous() : at::Tensor();
  const at::Tensor scatter = scatter_index ? scatter_index->contiguous() : at::Tensor();
  const int64_t* gather_row = gather_index ? gather.data_ptr<int64_t>() : nullptr;
  const int64_t* scatter_row = scatter_index ? scatter.data_ptr<int64_t>() : nullptr;
  // dA in sorted order when a gather has to be inverted; else straight into grad_x's rows.
  thread_local std::vector<float> sorted_grad;  // the caller's thread owns it for this call
  std::vector<float> sorted_grad_once;
  float* grad_a = compute_grad_x && gather_row ? workspace(sorted_grad, sorted_grad_once, active * d_in)
                                               : grad_x.data_ptr<float>();
  const bool tanh_form = activation == 2;

  // Experts largest first (ties by id: a fixed order), handed out dynamically.
  std::vector<int64_t> order(num_experts);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return offset[a + 1] - offset[a] > offset[b + 1] - offset[b];
  });
  std::atomic<int64_t> next{0};
  const float* gy_data = gy.data_ptr<float>();
  const float* x_data = xs.data_ptr<float>();
  const float* pre_data = pre.data_ptr<float>();
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_experts));

  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    // Per-thread tile buffers, reused across this thread's experts.
    thread_local std::vector<float> g_buf, x_buf, dp_buf, h_buf;
    std::vector<float> g_once, x_once, dp_once, h_once;
    float* const g_tile = workspace(g_buf, g_once, scatter_row ? kTile * d_out : 0);
    float* const x_tile = workspace(x_buf, x_once, gather_row ? kTile * d_in : 0);
    float* const dp = workspace(dp_buf, dp_once, kTile * hidden);
    float* const h = workspace(h_buf, h_once, kTile * hidden);
    for (int64_t slot = next++; slot < num_experts; slot = next++) {
      const int64_t e = order[slot], first = offset[e], count = offset[e + 1] - first;
      const float* w1_e = w1s.data_ptr<float>() + e * d_in * hidden;
      const float* w2_e = w2s.data_ptr<float>() + e * hidden * d_out;
      float* dw1 = grad_w1.data_ptr<float>() + e * d_in * hidden;
      float* dw2 = grad_w2.data_ptr<float>() + e * hidden * d_out;
      float* db1 = compute_bias1 ? grad_b1.data_ptr<float>() + e * hidden : nullptr;
      float* db2 = compute_bias2 ? grad_b2.data_ptr<float>() + e * d_out : nullptr;
      if (count == 0) {  // an empty expert: zero weight gradients (the biases' are zeros already)
        std::fill(dw1, dw1 + d_in * hidden, 0.0f);
        std::fill(dw2, dw2 + hidden * d_out, 0.0f);
        continue;
      }
      for (int64_t tile = 0; tile < count; tile += kTile) {
        const int64_t m = std::min(kTile, count - tile), row0 = first + tile;
        const bool accumulate = tile > 0;
        // G: the tile's output gradients, gathered once (read by dH, dW2 and db2).
        const float* g = gy_data + row0 * d_out;
        if (scatter_row) {
          gather_rows(gy_data, scatter_row + row0, m, d_out, g_tile);
          g = g_tile;
        }
        const float* xt = x_data + row0 * d_in;
        if (gather_row) {
          gather_rows(x_data, gather_row + row0, m, d_in, x_tile);
          xt = x_tile;
        }
        gemm_abt(m, hidden, d_out, g, d_out, w2_e, d_out, dp, hidden);  // dH = G W2^T
        gelu::gelu_and_grad_rows(pre_data + row0 * hidden, dp, h, m * hidden, tanh_form);  // H, dP
        gemm_atb(m, hidden, d_out, h, hidden, g, d_out, accumulate, dw2);   // dW2 += H^T G
        gemm_atb(m, d_in, hidden, xt, d_in, dp, hidden, accumulate, dw1);   // dW1 += X^T dP
        if (db2) add_column_sums(g, m, d_out, db2);
        if (db1) add_column_sums(dp, m, hidden, db1);
        if (compute_grad_x)  // dA = dP W1^T, W1_e stored (d_in, h)
          gemm_abt(m, d_in, hidden, dp, hidden, w1_e, hidden, grad_a + row0 * d_in, d_in);
      }
    }
  });

  if (compute_grad_x && gather_row && active > 0 && d_in > 0) {
    // grad_x[r] = sum of dA rows i with gather[i] = r, in increasing i: gather's inverse as CSR.
    const int64_t tokens = x.size(0);
    std::vector<int64_t> start(tokens + 1, 0), member(active);
    for (int64_t i = 0; i < active; ++i) ++start[gather_row[i] + 1];
    for (int64_t r = 0; r < tokens; ++r) start[r + 1] += start[r];
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < active; ++i) member[fill[gather_row[i]]++] = i;
    const float* da = grad_a;
    float* gx = grad_x.data_ptr<float>();
    at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        float* dst = gx + r * d_in;  // zeros already
        for (int64_t j = start[r]; j < start[r + 1]; ++j) {
          const float* src = da + member[j] * d_in;
          for (int64_t c = 0; c < d_in; ++c) dst[c] += src[c];
        }
      }
    });
  }
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2};
}

}  // namespace

TORCH_LIBRARY_IMPL(sm4, CPU, m) { m.impl("grouped_ffn_backward", &grouped_ffn_backward_cpu); }

}  // namespace sm4
