// Direct fp32 GEMM through the BLAS that torch itself links (MKL in the x86 wheels), bypassing
// at::mm's dispatch, checks and tensor views: at the papers' expert shapes (about 48 x 64 x 128
// per expert) that bookkeeping costs as much as the multiply. The symbol is weak: where torch's
// BLAS does not export sgemm_, available() is false and the caller keeps its at::mm path.
#pragma once

#include <climits>
#include <cstdint>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace sm4 {
namespace blas {

// True when sgemm_ resolved and every extent fits BLAS's 32-bit int.
inline bool available(int64_t largest_extent) { return sgemm_ != nullptr && largest_extent < INT_MAX; }

// Row-major C (m x n, row stride ldc) = A (m x k, row stride lda) @ B + beta * C, where B is
// (k x n, row stride ldb), or, when transpose_b, B^T with B stored (n x k, row stride ldb).
// (Row-major C is column-major C^T = B^T A^T: the operands swap.) Single-threaded inside a
// parallel region (MKL does not nest), so the result does not depend on the thread count.
inline void gemm_rows(bool transpose_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                      int64_t ldb, float beta, float* c, int64_t ldc) {
  const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
  const int la = static_cast<int>(ldb > 0 ? ldb : 1), lb = static_cast<int>(lda > 0 ? lda : 1);
  const int lc = static_cast<int>(ldc > 0 ? ldc : 1);
  const float one = 1.0f;
  sgemm_(transpose_b ? "T" : "N", "N", &mi, &ni, &ki, &one, b, &la, a, &lb, &beta, c, &lc);
}

// Row-major D (k x n, row stride n) = X^T G + beta * D, X (m x k, row stride ldx), G (m x n, row
// stride ldg): the weight gradient of one expert (column-major D^T = G^T X).
inline void gemm_at_b(int64_t m, int64_t k, int64_t n, const float* x, int64_t ldx, const float* g, int64_t ldg,
                      float beta, float* d) {
  const int mi = static_cast<int>(n), ni = static_cast<int>(k), ki = static_cast<int>(m);
  const int la = static_cast<int>(ldg > 0 ? ldg : 1), lb = static_cast<int>(ldx > 0 ? ldx : 1);
  const int lc = static_cast<int>(n > 0 ? n : 1);
  const float one = 1.0f;
  sgemm_("N", "T", &mi, &ni, &ki, &one, g, &la, x, &lb, &beta, d, &lc);
}

}  // namespace blas
}  // namespace sm4
