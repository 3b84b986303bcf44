// The op contract of the compiled extension sm4._C: every schema is declared here, once.
//
// Each backend adds its kernels for these schemas with its own TORCH_LIBRARY_IMPL block
// (csrc/cpu/*.cpp for the CPU dispatch key, csrc/cuda/*.cpp for CUDA). Fake (meta) kernels and
// autograd formulas are registered in Python (sm4/_extension.py), as in pytorch/extension-cpp, so
// that torch.compile and torch.library.opcheck see every op.
//
// Conventions shared by every op:
//   * expert ids are int32 or int64 with -1 marking "no assignment" (a rank >= the token's k);
//   * counts and offsets are int64, so A = sum of k_t may exceed 2^31 rows;
//   * nothing here syncs with the host: shapes depend only on (T, k_max, E, d).

#include <Python.h>
#include <torch/library.h>

// `import sm4._C` only has to load the library so the registrations below run; the module
// itself is empty.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "sm4 compiled kernels; ops live in torch.ops.sm4", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(sm4, m) {
  // Per-expert assignment counts and their exclusive prefix sum.
  //   expert_ids: (T, k_max) int32/int64, values in [-1, num_experts); -1 = no assignment.
  //   returns counts (E,) int64 and offsets (E + 1,) int64 with offsets[E] = A.
  m.def("expert_histogram(Tensor expert_ids, int num_experts) -> (Tensor counts, Tensor offsets)");

  // Fused noisy top-k gating, forward (SM4_SPEC §2; sm4/reference.py topk_gating is the truth).
  //   x: (T, d) fp16/bf16/fp32/fp64; router_weight: (d, E); noise: (T, E) standard normal or
  //   None (used only when sigma > 0); token_k: (T,) int or None (then every token has k).
  //   sigma = noise_std / E in training, 0 otherwise (0 also means hard-count load).
  //   returns gates (T, k), expert_ids (T, k) int64 (-1 = inactive rank), entropy (T,),
  //   importance (E,), load (E,) (floats in the accumulation type: fp32, fp64 for fp64 x),
  //   expert_counts (E,) int64, runner_up (T,) int64: the (k_t + 1)-th expert, -1 if none, and
  //   logits (T, E): the clean router logits, NaN rows for non-finite tokens. The last two are for
  //   the backward (saving the logits, 4 bytes per token and expert, spares it the router GEMM and
  //   a second read of x). (A float output comes first: opcheck's autograd test sums the outputs
  //   into the first one's dtype.)
  m.def(
      "topk_gating_forward(Tensor x, Tensor router_weight, Tensor? noise, Tensor? token_k, int k, "
      "float sigma, bool renormalize) -> (Tensor gates, Tensor expert_ids, Tensor entropy, "
      "Tensor importance, Tensor load, Tensor expert_counts, Tensor runner_up, Tensor logits)");
  // Its backward up to the router logits: grad_logits (T, E) in the accumulation type, from the
  // gradients of gates (T, k), importance (E,) and load (E,) and the forward's saved logits
  // (zero rows for non-finite tokens). The caller finishes with two matmuls:
  // grad_x = grad_logits @ W^T and grad_W = x^T @ grad_logits.
  // Token permutation (see sm4/types.py RoutingMetadata). A counting sort over E + 1 bins (the
  // last for inactive assignments, which so land in the padding rows in (token, rank) order):
  //   expert_ids (T, k) -> counts (E,), offsets (E + 1,), sorted_assignment (T*k,),
  //   sorted_token (T*k,), assignment_row (T, k) (-1 for inactive), all int64; stable.
  m.def(
      "routing_metadata(Tensor expert_ids, int num_experts) -> (Tensor expert_counts, "
      "Tensor expert_offsets, Tensor sorted_assignment, Tensor sorted_token, Tensor assignment_row)");
  // x (T, d) -> (N = T * k, d): row assignment_row[t, r] = x[t] for each active (t, r); rows from
  // expert_offsets[E] on are zero. (Written by assignment so the backward needs only this op's
  // inputs: it gathers each token's rows back.)
  m.def("permute(Tensor x, Tensor assignment_row, Tensor expert_offsets) -> Tensor");
  // grad of permute: grad_x[t] = sum over t's active ranks r of grad_sorted[assignment_row[t, r]].
  m.def("permute_backward(Tensor grad_sorted, Tensor assignment_row) -> Tensor");
  // y[t] = sum over active r of gates[t, r] * y_sorted[assignment_row[t, r]], accumulated in fp32
  // (fp64 for fp64) in rank order; y has y_sorted's dtype.
  m.def("unpermute(Tensor y_sorted, Tensor gates, Tensor assignment_row) -> Tensor");
  // grads of unpermute: grad_y_sorted (N, d) (zero on padding rows) and grad_gates (T, k).
  m.def(
      "unpermute_backward(Tensor grad_y, Tensor y_sorted, Tensor gates, Tensor assignment_row) -> "
      "(Tensor grad_y_sorted, Tensor grad_gates)");
  // Grouped GEMM over rows in expert order (the expert layers; sm4/reference.py grouped_mm is the
  // truth). Row i of M sorted rows (M = gather_index.numel(), or a.size(0) without it) belongs to
  // expert e when expert_offsets[e] <= i < expert_offsets[e + 1]; rows >= expert_offsets[E] are
  // inactive. With W_e = weight[e] (E, K, N), or weight[e]^T when transpose_weight (E, N, K):
  //   pre_i = a[gather_index[i] or i] @ W_e + bias[e]          (accumulated in fp32)
  //   out[scatter_index[i] or i] = act(pre_i) * scatter_scale[i]   (scale 1 when absent)
  // activation: 0 none, 1 exact GELU (erf), 2 GELU tanh. out is (num_out_rows, N) in a's dtype and
  // every row no active row writes is zero. preact (M, N) holds pre_i (zero rows when inactive)
  // when save_preact and activation != 0, else it is (0, N). weight and bias have a's dtype;
  // indices are int64; scatter_index values are distinct. Gather in the prologue and scatter
  // (times the gate) in the epilogue make the fused MoE path: no x_sorted copy is ever made.
  m.def(
      "grouped_mm(Tensor a, Tensor weight, Tensor? bias, Tensor expert_offsets, Tensor? gather_index, "
      "Tensor? scatter_index, Tensor? scatter_scale, int num_out_rows, bool transpose_weight, int activation, "
      "bool save_preact) -> (Tensor out, Tensor preact)");
  // Per-expert weight (and bias) gradient of grouped_mm, deterministic (fixed order, no atomics):
  //   grad_weight[e] = sum over rows i of e of a[a_index[i] or i]^T grad[grad_index[i] or i]
  //   grad_bias[e]   = sum over rows i of e of grad[grad_index[i] or i]
  // grad_weight (E, K, N) and grad_bias (E, N) (or (0, N) unless compute_bias) in a's dtype,
  // accumulated in fp32; E = expert_offsets.numel() - 1; empty experts get zeros.
  m.def(
      "grouped_weight_grad(Tensor a, Tensor grad, Tensor expert_offsets, Tensor? a_index, Tensor? grad_index, "
      "bool compute_bias) -> (Tensor grad_weight, Tensor grad_bias)");
  // Fused fp32 backward of the FFN experts out = act(a @ W1 + b1) @ W2 + b2 (sm4/grouped.py
  // ExpertFFN; the truth is autograd of two reference grouped_mm calls). Sorted row i of M =
  // preact.size(0) belongs to expert e when expert_offsets[e] <= i < expert_offsets[e + 1] (rows
  // >= expert_offsets[E] are inactive and contribute nothing); it reads x[gather_index[i] or i] and
  // its output gradient grad_out[scatter_index[i] or i]. preact (M, h) is the saved pre-activation;
  // activation 1 exact GELU, 2 GELU tanh. x (T, d_in), w1 (E, d_in, h), w2 (E, h, d_out), grad_out
  // (R, d_out), all float32. Returns grad_x (T, d_in) (each x row the sum over the sorted rows that
  // read it, zero for rows none reads; (0, d_in) unless compute_grad_x), grad_w1 (E, d_in, h),
  // grad_b1 (E, h) (or (0, h) unless compute_bias1), grad_w2 (E, h, d_out), grad_b2 (E, d_out) (or
  // (0, d_out)); empty experts get zeros. Deterministic, independent of the thread count.
  m.def(
      "grouped_ffn_backward(Tensor grad_out, Tensor x, Tensor w1, Tensor w2, Tensor preact, Tensor expert_offsets, "
      "Tensor? gather_index, Tensor? scatter_index, int activation, bool compute_grad_x, bool compute_bias1, "
      "bool compute_bias2) -> (Tensor grad_x, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, Tensor grad_b2)");
  m.def(
      "topk_gating_backward(Tensor grad_gates, Tensor grad_importance, Tensor grad_load, Tensor logits, "
      "Tensor? noise, Tensor expert_ids, Tensor runner_up, float sigma, bool renormalize) -> Tensor grad_logits");
}
