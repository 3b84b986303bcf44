// fp32 GELU and its derivative over a row of pre-activations, one exp per element: the forward's
// epilogue (gelu_rows) and the fused FFN backward's dH epilogue (gelu_and_grad_rows).
//
// Why not at::gelu_ / at::gelu_backward: each call costs ~10 us of set-up (at the papers' shapes a
// 48 x 128 block takes about as long to set up as to compute), and the backward would otherwise
// recompute GELU (one erf) and its derivative (a second erf and an exp) in two passes over N x h.
// Here one exp serves both: exact GELU uses erf(x / sqrt 2) = 1 - t P(t) exp(-x^2 / 2) (Abramowitz
// & Stegun 7.1.26, |error| <= 1.5e-7, below fp32's tolerance of the layer) and the Gaussian density
// phi(x) = exp(-x^2 / 2) / sqrt(2 pi) reuses that exp; GELU-tanh uses tanh(u) = 1 - 2 / (exp(2u) + 1).
//
// AVX2 + FMA (8 lanes) where the CPU has them (checked at run time, once), a scalar loop
// elsewhere; both evaluate the same formulas, so a result differs between the two paths only in
// the last bits of exp. Deterministic on one machine.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SM4_GELU_X86 1
#endif

namespace sm4 {
namespace gelu {

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;  // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kTanhCubic = 0.044715f;
// Abramowitz & Stegun 7.1.26: erf(z) = 1 - (a1 t + ... + a5 t^5) exp(-z^2), t = 1 / (1 + p z), z >= 0.
constexpr float kP = 0.3275911f, kA1 = 0.254829592f, kA2 = -0.284496736f, kA3 = 1.421413741f,
                kA4 = -1.453152027f, kA5 = 1.061405429f;

// ---- scalar (the fallback, and the tail of each vector loop) ----------------------------------

// Phi(x) (the normal CDF) and phi(x) (its density) from one exp.
inline void normal_cdf_pdf(float x, float& cdf, float& pdf) {
  const float e = std::exp(-0.5f * x * x);
  const float z = std::fabs(x) * kInvSqrt2;
  const float t = 1.0f / (1.0f + kP * z);
  const float poly = t * (kA1 + t * (kA2 + t * (kA3 + t * (kA4 + t * kA5))));
  const float erf_abs = 1.0f - poly * e;
  cdf = 0.5f * (1.0f + std::copysign(erf_abs, x));
  pdf = kInvSqrt2Pi * e;
}

// tanh(u) from one exp, u clamped where tanh is +-1 in fp32 (exp would overflow).
inline float tanh_one_exp(float u) {
  u = std::fmin(std::fmax(u, -10.0f), 10.0f);
  return 1.0f - 2.0f / (std::exp(2.0f * u) + 1.0f);
}

// value = gelu(x); slope = gelu'(x). tanh_form: the tanh approximation (activation code 2).
inline void gelu_scalar(float x, bool tanh_form, float& value, float& slope) {
  if (tanh_form) {
    const float inner = kSqrt2OverPi * (x + kTanhCubic * x * x * x);
    const float t = tanh_one_exp(inner);
    value = 0.5f * x * (1.0f + t);
    slope = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kTanhCubic * x * x);
  } else {
    float cdf, pdf;
    normal_cdf_pdf(x, cdf, pdf);
    value = x * cdf;
    slope = cdf + x * pdf;
  }
}

#ifdef SM4_GELU_X86
// ---- AVX2 + FMA (8 lanes) ---------------------------------------------------------------------

// exp(x) for x in [-88, 88] (clamped): 2^n * p(r), r = x - n ln2, degree-6 polynomial (Cephes
// expf's coefficients), relative error about 2 ulp.
__attribute__((target("avx2,fma"))) inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// value and slope of 8 lanes (see gelu_scalar).
__attribute__((target("avx2,fma"))) inline void gelu8(__m256 x, bool tanh_form, __m256& value, __m256& slope) {
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  if (tanh_form) {
    const __m256 x2 = _mm256_mul_ps(x, x);
    const __m256 inner = _mm256_mul_ps(_mm256_set1_ps(kSqrt2OverPi),
                                       _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(kTanhCubic), x2), x, x));
    const __m256 u = _mm256_min_ps(_mm256_max_ps(inner, _mm256_set1_ps(-10.0f)), _mm256_set1_ps(10.0f));
    const __m256 e = exp8(_mm256_add_ps(u, u));
    const __m256 t = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, one)));
    const __m256 one_t = _mm256_add_ps(one, t);
    value = _mm256_mul_ps(_mm256_mul_ps(half, x), one_t);
    const __m256 dinner = _mm256_mul_ps(_mm256_set1_ps(kSqrt2OverPi),
                                        _mm256_fmadd_ps(_mm256_set1_ps(3.0f * kTanhCubic), x2, one));
    const __m256 sech2 = _mm256_fnmadd_ps(t, t, one);
    slope = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_mul_ps(half, x), sech2), dinner, _mm256_mul_ps(half, one_t));
    return;
  }
  const __m256 e = exp8(_mm256_mul_ps(_mm256_set1_ps(-0.5f), _mm256_mul_ps(x, x)));
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  const __m256 z = _mm256_mul_ps(_mm256_andnot_ps(sign_mask, x), _mm256_set1_ps(kInvSqrt2));
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(kP), z, one));
  __m256 poly = _mm256_fmadd_ps(_mm256_set1_ps(kA5), t, _mm256_set1_ps(kA4));
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(kA3));
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(kA2));
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(kA1));
  poly = _mm256_mul_ps(poly, t);
  const __m256 erf_abs = _mm256_fnmadd_ps(poly, e, one);
  const __m256 erf = _mm256_or_ps(erf_abs, _mm256_and_ps(sign_mask, x));  // copysign (erf_abs >= 0)
  const __m256 cdf = _mm256_mul_ps(half, _mm256_add_ps(one, erf));
  value = _mm256_mul_ps(x, cdf);
  slope = _mm256_fmadd_ps(x, _mm256_mul_ps(_mm256_set1_ps(kInvSqrt2Pi), e), cdf);
}

__attribute__((target("avx2,fma"))) inline int64_t gelu_rows_avx2(float* y, float* keep_pre, int64_t n,
                                                                  bool tanh_form) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(y + i);
    if (keep_pre) _mm256_storeu_ps(keep_pre + i, x);
    __m256 value, slope;
    gelu8(x, tanh_form, value, slope);
    _mm256_storeu_ps(y + i, value);
  }
  return i;
}

__attribute__((target("avx2,fma"))) inline int64_t gelu_and_grad_rows_avx2(const float* pre, float* grad, float* hidden,
                                                                           int64_t n, bool tanh_form) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 value, slope;
    gelu8(_mm256_loadu_ps(pre + i), tanh_form, value, slope);
    _mm256_storeu_ps(hidden + i, value);
    _mm256_storeu_ps(grad + i, _mm256_mul_ps(slope, _mm256_loadu_ps(grad + i)));
  }
  return i;
}
#endif

// Whether this CPU runs the AVX2 + FMA loops (asked once).
inline bool use_avx2() {
#ifdef SM4_GELU_X86
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// y[0:n] = gelu(y[0:n]) in place; keep_pre (or null) receives the pre-activation first.
inline void gelu_rows(float* y, float* keep_pre, int64_t n, bool tanh_form) {
  int64_t i = 0;
#ifdef SM4_GELU_X86
  if (use_avx2()) i = gelu_rows_avx2(y, keep_pre, n, tanh_form);
#endif
  for (; i < n; ++i) {
    if (keep_pre) keep_pre[i] = y[i];
    float slope;
    gelu_scalar(y[i], tanh_form, y[i], slope);
  }
}

// From the pre-activation: hidden = gelu(pre) and grad = gelu'(pre) * grad (in place), n elements.
inline void gelu_and_grad_rows(const float* pre, float* grad, float* hidden, int64_t n, bool tanh_form) {
  int64_t i = 0;
#ifdef SM4_GELU_X86
  if (use_avx2()) i = gelu_and_grad_rows_avx2(pre, grad, hidden, n, tanh_form);
#endif
  for (; i < n; ++i) {
    float value, slope;
    gelu_scalar(pre[i], tanh_form, value, slope);
    hidden[i] = value;
    grad[i] *= slope;
  }
}

}  // namespace gelu
}  // namespace sm4
