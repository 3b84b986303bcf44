// CPU kernels of sm4::topk_gating_forward / topk_gating_backward (SM4_SPEC §2).
//
// Tokens are processed in fixed blocks (token_block(d) tokens), in parallel over blocks. For each
// block the router logits come from one small GEMM written straight into the saved-logits output
// (the (T, E) logits are produced once and read back while still in cache), then each token's
// routing is computed in one pass: noise, softmax, top-k with ties to the lower index, per-token
// k, gates, entropy, and its contributions to the importance / load / count sums. Those sums are
// kept per block and added up in block order at the end, so the result does not depend on the
// number of threads.
//
// The forward returns the clean logits (4 bytes per token and expert) so that the backward, a
// per-token pass that returns d loss / d logits, needs neither the router GEMM nor x; the caller
// turns d logits into grad_x and grad_W with two matmuls.
//
// Speed: the per-token work is a handful of passes over E values (exp, sums, the normal CDF of
// the smooth load), written as plain branch-free loops that the compiler turns into 8-wide AVX2
// code (see SM4_VECTOR_CLONES); at E = 32 a token costs a few tens of nanoseconds.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "index_checks.h"

namespace sm4 {
namespace {

// Tokens per block: about 8k elements of x per GEMM (128 tokens at d = 64, 32 from d = 256 up),
// large enough that the per-block GEMM call costs little next to its work, small enough that the
// block and its logits stay in L2 while the per-token pass reads them and that a few hundred
// tokens still split evenly over the threads. It depends only on d, so the block partial sums,
// and hence the results, are the same on every run.
int64_t token_block(int64_t dim) { return std::clamp<int64_t>(8192 / std::max<int64_t>(dim, 1), 32, 256); }

// The per-token loops below are inlined into one routine per direction, and that routine is
// multi-versioned: the loader picks its AVX2 clone where the CPU has it, so one build runs
// everywhere and still uses 8-wide vectors. The loops are branch-free (selects, not ifs) so that
// they vectorise without fast-math; their reductions use explicit lanes (lane_sum) so that the
// result does not depend on what the compiler vectorised.
#define SM4_INLINE inline __attribute__((always_inline))
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SM4_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SM4_VECTOR_CLONES
#endif

// exp(x) for x <= ~0 (softmax numerators, normal densities); below -87 it returns exp(-87) ~ 2e-38
// rather than a denormal (callers cut the tails they need exactly zero). fp32: Cephes-style,
// exp(x) = 2^n * exp(r), r = x - n ln2 in [-ln2/2, ln2/2], exp(r) by a degree-6 polynomial
// (relative error < 2 ulp), no libm call so that it vectorises. fp64: libm.
SM4_INLINE float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  // Round to nearest by adding and removing 1.5 * 2^23.
  const float fn = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - fn * 0.693359375f) + fn * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fn) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
SM4_INLINE double exp_nonpositive(double x) { return std::exp(x); }

// The standard normal CDF. fp32: Phi(z) = erfc(-z / sqrt 2) / 2 with erfc(a) = t exp(-a^2 + P(t)),
// t = 1 / (1 + a / 2), Numerical Recipes' Chebyshev fit (relative error < 1.2e-7 for every a >= 0),
// branch-free so that it vectorises. fp64: libm's erfc. Past |z| = 9, Phi is within 1e-19 of 0 or
// 1, below fp32 and fp64 resolution of the load sums: both return exactly 0 or 1 there.
SM4_INLINE float normal_cdf(float z) {
  const float x = -z * 0.70710678118654752440f;
  float a = x < 0.0f ? -x : x;
  a = a < 6.5f ? a : 6.5f;
  const float t = 1.0f / (1.0f + 0.5f * a);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  const float erfc_abs = t * exp_nonpositive(p - a * a);
  float phi = 0.5f * (x < 0.0f ? 2.0f - erfc_abs : erfc_abs);
  phi = z < -9.0f ? 0.0f : phi;
  return z > 9.0f ? 1.0f : phi;
}
SM4_INLINE double normal_cdf(double z) {
  if (z < -9) return 0;
  if (z > 9) return 1;
  return 0.5 * std::erfc(-z * 0.70710678118654752440);
}

// The standard normal density, exactly 0 past |z| = 9 (below 1e-18; matches normal_cdf's cut).
template <typename acc_t>
SM4_INLINE acc_t normal_pdf(acc_t z) {
  const acc_t density = acc_t(0.39894228040143267794) * exp_nonpositive(acc_t(-0.5) * z * z);
  return (z < acc_t(-9) || z > acc_t(9)) ? acc_t(0) : density;
}

// True when no value is NaN or infinite: an exponent-bits test, so that it vectorises (and is not
// folded away, as isfinite can be under fast-math).
SM4_INLINE bool all_finite(const float* v, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, v + i, sizeof(bits));
    bad |= (bits & 0x7f800000u) == 0x7f800000u;
  }
  return bad == 0;
}
SM4_INLINE bool all_finite(const double* v, int64_t n) {
  return std::all_of(v, v + n, [](double value) { return std::isfinite(value); });
}

// Reductions over a token's experts with 8 independent lanes combined in a fixed order: the same
// result on every run (unlike a compiler reassociation), and no serial chain of dependent adds.
template <typename acc_t>
SM4_INLINE acc_t lane_sum(const acc_t* v, int64_t n) {
  acc_t lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) lanes[j] += v[i + j];
  for (int j = 0; i < n; ++i, ++j) lanes[j] += v[i];
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

template <typename acc_t>
SM4_INLINE acc_t lane_max(const acc_t* v, int64_t n) {
  acc_t lanes[8];
  for (int j = 0; j < 8; ++j) lanes[j] = v[0];
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) lanes[j] = v[i + j] > lanes[j] ? v[i + j] : lanes[j];
  for (; i < n; ++i) lanes[0] = v[i] > lanes[0] ? v[i] : lanes[0];
  acc_t m = lanes[0];
  for (int j = 1; j < 8; ++j) m = lanes[j] > m ? lanes[j] : m;
  return m;
}

// out = exp(values - shift); returns the sum of out (the softmax partition relative to shift).
template <typename acc_t>
SM4_INLINE acc_t exp_and_sum(const acc_t* values, acc_t shift, acc_t* out, int64_t n) {
  for (int64_t e = 0; e < n; ++e) out[e] = exp_nonpositive(values[e] - shift);
  return lane_sum(out, n);
}

// noisy = clean + sigma * noise (the noisy logits of one token).
template <typename acc_t>
SM4_INLINE void add_noise(const acc_t* clean, const acc_t* noise, acc_t sigma, acc_t* noisy, int64_t n) {
  for (int64_t e = 0; e < n; ++e) noisy[e] = clean[e] + sigma * noise[e];
}

// The first `count` entries of `order` become the experts with the largest noisy logits, by
// (logit descending, index ascending): a strict total order, so equal logits go to the lower index.
// For a few ranks, one pass keeps the best `count` in a small sorted list: most experts fail the
// first comparison (against the current last place), so the pass costs about one compare each.
// A later expert enters only if strictly greater, so equal logits keep the lower index first.
// `best` receives the logits of the ranked experts (best[r] = noisy[order[r]]); both arrays need
// room for num_experts entries.
template <typename acc_t>
SM4_INLINE void rank_experts(const acc_t* noisy, int64_t num_experts, int64_t count, int64_t* order, acc_t* best) {
  if (count <= 8) {
    int64_t filled = 0;
    for (int64_t e = 0; e < num_experts; ++e) {
      const acc_t v = noisy[e];
      if (filled == count && !(v > best[count - 1])) continue;
      int64_t p = filled < count ? filled++ : count - 1;
      while (p > 0 && v > best[p - 1]) {
        best[p] = best[p - 1];
        order[p] = order[p - 1];
        --p;
      }
      best[p] = v;
      order[p] = e;
    }
    return;
  }
  std::iota(order, order + num_experts, int64_t{0});
  std::partial_sort(order, order + count, order + num_experts, [noisy](int64_t a, int64_t b) {
    return noisy[a] > noisy[b] || (noisy[a] == noisy[b] && a < b);
  });
  for (int64_t r = 0; r < count; ++r) best[r] = noisy[order[r]];
}

struct GatingInputs {
  at::Tensor x, weight, noise, token_k;  // weight and noise in the accumulation type, contiguous
  int64_t num_tokens, num_experts, k;
};

GatingInputs prepare(const at::Tensor& x, const at::Tensor& router_weight,
                     const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& token_k,
                     int64_t k, double sigma, const char* op) {
  check_shape(x, {-1, -1}, op, "x", "(T, d)");
  check_floating(x, op, "x");
  check_shape(router_weight, {x.size(1), -1}, op, "router_weight", "(d, E), d from x");
  check_floating(router_weight, op, "router_weight");
  const int64_t num_experts = router_weight.size(1);
  TORCH_CHECK_VALUE(num_experts >= 1 && k >= 1 && k <= num_experts, op, ": k must lie in [1, E = ", num_experts,
                    "], got k = ", k);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Detached: the kernel's own at:: calls (mm_out into the saved logits) must not meet autograd.
  GatingInputs in{x.detach(), router_weight.detach().to(acc).contiguous(), at::Tensor(), at::Tensor(), x.size(0), num_experts, k};
  if (sigma > 0) {
    TORCH_CHECK_VALUE(noise.has_value(), op, ": sigma = ", sigma, " > 0 needs the noise tensor, got noise = None");
    check_shape(*noise, {x.size(0), num_experts}, op, "noise", "(T, E)");
    check_floating(*noise, op, "noise");
    in.noise = noise->to(acc).contiguous();
  }
  if (token_k.has_value()) {
    check_shape(*token_k, {x.size(0)}, op, "token_k", "(T,)");
    check_index_dtype(*token_k, op, "token_k");
    // Out-of-range values are clamped (the Python API rejects them before they get here).
    in.token_k = token_k->to(at::kLong).clamp(1, k).contiguous();
  }
  return in;
}

// Per-thread work arrays of one token's E values.
template <typename acc_t>
struct TokenScratch {
  std::vector<acc_t> noisy, numerators, clean_numerators, values;
  std::vector<int64_t> order;
  explicit TokenScratch(int64_t experts)
      : noisy(experts), numerators(experts), clean_numerators(experts), values(experts), order(experts) {}
};

// What the forward's per-token pass reads and writes for a block of tokens. Pointers are to the
// first token of the block (logits, noise, outputs) or to the block's partial sums.
template <typename acc_t>
struct ForwardBlock {
  int64_t tokens, num_experts, k;
  acc_t sigma;
  bool renormalize;
  acc_t* logits;           // (tokens, E): the saved-logits output (rows of bad tokens become NaN)
  const acc_t* noise;      // (tokens, E) or null (no noise)
  const int64_t* token_k;  // (tokens,) or null (every token k)
  int64_t* expert_ids;     // (tokens, k)
  acc_t* gates;            // (tokens, k)
  acc_t* entropy;          // (tokens,)
  int64_t* runner_up;      // (tokens,)
  acc_t* importance;       // (E,) partial sums of this block
  acc_t* load;             // (E,)
  int64_t* counts;         // (E,)
};

// Gates are numerator / partition, or numerator / (sum of the active numerators) when renormalised.
template <typename acc_t>
SM4_INLINE acc_t renormalize_scale(bool renormalize, acc_t active_sum, acc_t partition) {
  return acc_t(1) / (renormalize ? active_sum : partition);
}

template <typename acc_t>
SM4_INLINE void route_block(const ForwardBlock<acc_t>& b, TokenScratch<acc_t>& s) {
  const int64_t E = b.num_experts, k = b.k;
  const bool noisy_routing = b.noise != nullptr;
  const int64_t ranked = std::min(k + 1, E);
  constexpr acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  for (int64_t i = 0; i < b.tokens; ++i) {
    acc_t* clean = b.logits + i * E;
    const int64_t kt = b.token_k ? b.token_k[i] : k;
    int64_t* ids = b.expert_ids + i * k;
    acc_t* gates = b.gates + i * k;
    // The noisy logits decide the routing, so a non-finite noise row (or a sum that overflows)
    // makes the token non-finite too, as in sm4/reference.py.
    const acc_t* noisy = clean;
    if (noisy_routing) {
      add_noise(clean, b.noise + i * E, b.sigma, s.noisy.data(), E);
      noisy = s.noisy.data();
    }
    if (!all_finite(clean, E) || (noisy_routing && !all_finite(noisy, E))) {
      // Routed as if every logit were equal; NaN gates, entropy and saved logits; not in
      // importance/load.
      std::fill(clean, clean + E, nan);
      for (int64_t r = 0; r < k; ++r) {
        ids[r] = r < kt ? r : -1;
        gates[r] = r < kt ? nan : acc_t(0);
        if (r < kt) ++b.counts[r];
      }
      b.entropy[i] = nan;
      b.runner_up[i] = -1;
      continue;
    }
    acc_t* best = s.values.data();  // noisy logits of the ranked experts, in rank order
    rank_experts(noisy, E, ranked, s.order.data(), best);
    const int64_t* order = s.order.data();

    // Noisy softmax: only the partition and the selected experts' numerators are needed.
    const acc_t noisy_max = best[0];
    const acc_t noisy_partition = exp_and_sum(noisy, noisy_max, s.numerators.data(), E);
    acc_t active_sum = 0;
    for (int64_t r = 0; r < kt; ++r) active_sum += s.numerators[order[r]];
    const acc_t scale = renormalize_scale(b.renormalize, active_sum, noisy_partition);
    for (int64_t r = 0; r < k; ++r) {
      const bool active = r < kt;
      ids[r] = active ? order[r] : -1;
      gates[r] = active ? s.numerators[order[r]] * scale : acc_t(0);
      if (active) ++b.counts[order[r]];
    }
    b.runner_up[i] = kt < E ? order[kt] : -1;
    // The smooth load's thresholds: the (k_t + 1)-th noisy logit for selected experts (none when
    // k_t = E), the k_t-th for the others.
    const acc_t threshold_selected = kt < E ? best[kt] : -std::numeric_limits<acc_t>::infinity();
    const acc_t threshold_unselected = best[kt - 1];

    // Clean softmax q (importance, entropy): the noisy one when there is no noise.
    acc_t clean_max = noisy_max, clean_partition = noisy_partition;
    acc_t* q = s.numerators.data();
    if (noisy_routing) {
      clean_max = lane_max(clean, E);
      clean_partition = exp_and_sum(clean, clean_max, s.clean_numerators.data(), E);
      q = s.clean_numerators.data();
    }
    const acc_t inverse = acc_t(1) / clean_partition;
    // H = -sum q log q with log q_e = (l_e - max) - log Z: no per-expert log.
    acc_t* weighted = s.values.data();  // best[] is no longer needed
    for (int64_t e = 0; e < E; ++e) {
      q[e] *= inverse;
      b.importance[e] += q[e];
      weighted[e] = q[e] * (clean[e] - clean_max);
    }
    b.entropy[i] = std::log(clean_partition) - lane_sum(weighted, E);

    if (noisy_routing) {
      // Phi((l_e - threshold) / sigma): every expert against the unselected threshold, then the
      // selected ones (at most k) against theirs.
      acc_t* z = s.values.data();
      for (int64_t e = 0; e < E; ++e) z[e] = (clean[e] - threshold_unselected) / b.sigma;
      for (int64_t r = 0; r < kt; ++r) z[order[r]] = (clean[order[r]] - threshold_selected) / b.sigma;
      for (int64_t e = 0; e < E; ++e) b.load[e] += normal_cdf(z[e]);
    } else {
      for (int64_t r = 0; r < kt; ++r) b.load[order[r]] += 1;
    }
  }
}


// One direction's per-block routine, compiled per CPU target (see SM4_VECTOR_CLONES).
SM4_VECTOR_CLONES void route_block_float(const ForwardBlock<float>& b, TokenScratch<float>& s) { route_block(b, s); }
void route_block_double(const ForwardBlock<double>& b, TokenScratch<double>& s) { route_block(b, s); }
void route(const ForwardBlock<float>& b, TokenScratch<float>& s) { route_block_float(b, s); }
void route(const ForwardBlock<double>& b, TokenScratch<double>& s) { route_block_double(b, s); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
topk_gating_forward_cpu(const at::Tensor& x, const at::Tensor& router_weight,
                        const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& token_k,
                        int64_t k, double sigma, bool renormalize) {
  const KernelScope scope;
  const GatingInputs in = prepare(x, router_weight, noise, token_k, k, sigma, "sm4.topk_gating_forward");
  const int64_t T = in.num_tokens, E = in.num_experts;
  const auto acc_options = in.weight.options();
  const auto long_options = x.options().dtype(at::kLong);
  at::Tensor expert_ids = at::empty({T, k}, long_options);
  at::Tensor gates = at::empty({T, k}, acc_options);
  at::Tensor entropy = at::empty({T}, acc_options);
  at::Tensor runner_up = at::empty({T}, long_options);
  at::Tensor saved_logits = at::empty({T, E}, acc_options);
  const int64_t block_tokens = token_block(x.size(1));
  const int64_t num_blocks = (T + block_tokens - 1) / block_tokens;
  at::Tensor block_importance = at::zeros({num_blocks, E}, acc_options);
  at::Tensor block_load = at::zeros({num_blocks, E}, acc_options);
  at::Tensor block_counts = at::zeros({num_blocks, E}, long_options);
  // x in the accumulation type is multiplied as it is (any strides); other dtypes are converted
  // block by block. A non-finite row of x only makes its own logits non-finite, which the
  // per-token pass detects.
  const bool convert_x = x.scalar_type() != in.weight.scalar_type();

  AT_DISPATCH_FLOATING_TYPES(in.weight.scalar_type(), "topk_gating_forward_cpu", [&] {
    using acc_t = scalar_t;
    at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
      const KernelScope worker_scope;  // the caller's dispatch guards are thread-local
      TokenScratch<acc_t> scratch(E);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t t0 = blk * block_tokens, t1 = std::min(T, t0 + block_tokens);
        at::Tensor logits = saved_logits.slice(0, t0, t1);
        const at::Tensor x_block = in.x.slice(0, t0, t1);
        at::mm_out(logits, convert_x ? x_block.to(in.weight.scalar_type()) : x_block, in.weight);
        ForwardBlock<acc_t> block{
            t1 - t0,
            E,
            k,
            static_cast<acc_t>(sigma),
            renormalize,
            logits.data_ptr<acc_t>(),
            sigma > 0 ? in.noise.data_ptr<acc_t>() + t0 * E : nullptr,
            in.token_k.defined() ? in.token_k.data_ptr<int64_t>() + t0 : nullptr,
            expert_ids.data_ptr<int64_t>() + t0 * k,
            gates.data_ptr<acc_t>() + t0 * k,
            entropy.data_ptr<acc_t>() + t0,
            runner_up.data_ptr<int64_t>() + t0,
            block_importance.data_ptr<acc_t>() + blk * E,
            block_load.data_ptr<acc_t>() + blk * E,
            block_counts.data_ptr<int64_t>() + blk * E,
        };
        route(block, scratch);
      }
    });
  });

  // Block sums in block order, in double: deterministic whatever the thread count.
  at::Tensor importance = at::empty({E}, acc_options), load = at::empty({E}, acc_options);
  at::Tensor counts = at::zeros({E}, long_options);
  AT_DISPATCH_FLOATING_TYPES(in.weight.scalar_type(), "topk_gating_forward_reduce", [&] {
    const scalar_t* bi = block_importance.data_ptr<scalar_t>();
    const scalar_t* bl = block_load.data_ptr<scalar_t>();
    const int64_t* bc = block_counts.data_ptr<int64_t>();
    for (int64_t e = 0; e < E; ++e) {
      double imp = 0, ld = 0;
      int64_t cnt = 0;
      for (int64_t b = 0; b < num_blocks; ++b) {
        imp += bi[b * E + e];
        ld += bl[b * E + e];
        cnt += bc[b * E + e];
      }
      importance.data_ptr<scalar_t>()[e] = static_cast<scalar_t>(imp);
      load.data_ptr<scalar_t>()[e] = static_cast<scalar_t>(ld);
      counts.data_ptr<int64_t>()[e] = cnt;
    }
  });
  return {gates, expert_ids, entropy, importance, load, counts, runner_up, saved_logits};
}

// What the backward's per-token pass reads and writes for a range of tokens.
template <typename acc_t>
struct BackwardBlock {
  int64_t tokens, num_experts, k;
  acc_t sigma;
  bool renormalize;
  const acc_t* logits;        // (tokens, E), the forward's saved clean logits
  const acc_t* noise;         // (tokens, E) or null
  const int64_t* expert_ids;  // (tokens, k)
  const int64_t* runner_up;   // (tokens,)
  const acc_t* grad_gates;    // (tokens, k)
  const acc_t* grad_importance;  // (E,)
  const acc_t* grad_load;        // (E,)
  acc_t* grad_logits;            // (tokens, E)
};

template <typename acc_t>
SM4_INLINE void route_backward_block(const BackwardBlock<acc_t>& b, TokenScratch<acc_t>& s) {
  const int64_t E = b.num_experts, k = b.k;
  const acc_t* dI = b.grad_importance;
  const acc_t* dL = b.grad_load;
  for (int64_t i = 0; i < b.tokens; ++i) {
    const acc_t* clean = b.logits + i * E;
    acc_t* dl = b.grad_logits + i * E;
    // A non-finite token (saved as a NaN row) contributes no gradient.
    if (!all_finite(clean, E)) {
      std::fill(dl, dl + E, acc_t(0));
      continue;
    }
    const int64_t* ids = b.expert_ids + i * k;
    const acc_t* dg = b.grad_gates + i * k;
    int64_t kt = 0;
    while (kt < k && ids[kt] >= 0) ++kt;
    const acc_t* noisy = clean;
    if (b.noise) {
      add_noise(clean, b.noise + i * E, b.sigma, s.noisy.data(), E);
      noisy = s.noisy.data();
    }
    acc_t* p = s.numerators.data();
    const acc_t inverse = acc_t(1) / exp_and_sum(noisy, lane_max(noisy, E), p, E);
    for (int64_t e = 0; e < E; ++e) p[e] *= inverse;

    // Gates -> d noisy probabilities of the active experts (through the optional renormalisation),
    // then the softmax backward dl_e = p_e (dp_e - sum_j p_j dp_j), dp zero off the active experts
    // (noise is additive, so d noisy logits = d clean logits).
    acc_t d_active[8];
    std::vector<acc_t> d_active_large;
    acc_t* dp = d_active;
    if (kt > 8) {
      d_active_large.resize(kt);
      dp = d_active_large.data();
    }
    acc_t active_sum = 0, gate_dot = 0;
    for (int64_t r = 0; r < kt; ++r) active_sum += p[ids[r]];
    if (b.renormalize) {
      for (int64_t r = 0; r < kt; ++r) gate_dot += dg[r] * p[ids[r]] / active_sum;
      for (int64_t r = 0; r < kt; ++r) dp[r] = (dg[r] - gate_dot) / active_sum;
    } else {
      for (int64_t r = 0; r < kt; ++r) dp[r] = dg[r];
    }
    acc_t prob_dot = 0;
    for (int64_t r = 0; r < kt; ++r) prob_dot += p[ids[r]] * dp[r];
    for (int64_t e = 0; e < E; ++e) dl[e] = -p[e] * prob_dot;
    for (int64_t r = 0; r < kt; ++r) dl[ids[r]] += p[ids[r]] * dp[r];

    // Importance = sum of the clean softmax q.
    const acc_t* q = p;
    if (b.noise) {
      acc_t* clean_p = s.clean_numerators.data();
      const acc_t clean_inverse = acc_t(1) / exp_and_sum(clean, lane_max(clean, E), clean_p, E);
      for (int64_t e = 0; e < E; ++e) clean_p[e] *= clean_inverse;
      q = clean_p;
    }
    acc_t* scratch = s.values.data();
    for (int64_t e = 0; e < E; ++e) scratch[e] = q[e] * dI[e];
    const acc_t q_dot = lane_sum(scratch, E);
    for (int64_t e = 0; e < E; ++e) dl[e] += q[e] * (dI[e] - q_dot);

    // Smooth load: Phi((l_e - n_j) / sigma), j the threshold expert of e (the runner-up for a
    // selected expert, the last selected one for the others). a_e = d load_e / d l_e goes to e and,
    // with the opposite sign, to j.
    if (b.noise) {
      const int64_t runner = b.runner_up[i];
      const int64_t last_selected = ids[kt - 1];
      const acc_t threshold_unselected = noisy[last_selected];
      const acc_t threshold_selected = runner >= 0 ? noisy[runner] : acc_t(0);
      acc_t* a = s.values.data();
      for (int64_t e = 0; e < E; ++e) a[e] = (clean[e] - threshold_unselected) / b.sigma;
      for (int64_t r = 0; r < kt; ++r) a[ids[r]] = (clean[ids[r]] - threshold_selected) / b.sigma;
      for (int64_t e = 0; e < E; ++e) a[e] = normal_pdf(a[e]) / b.sigma * dL[e];
      acc_t selected_sum = 0;
      for (int64_t r = 0; r < kt; ++r) {
        if (runner < 0) a[ids[r]] = 0;  // k_t = E: the expert is selected whatever the noise
        selected_sum += a[ids[r]];
      }
      for (int64_t e = 0; e < E; ++e) dl[e] += a[e];
      // The unselected experts' sum, summed directly (not total - selected, which would cancel).
      for (int64_t r = 0; r < kt; ++r) a[ids[r]] = 0;
      dl[last_selected] -= lane_sum(a, E);
      if (runner >= 0) dl[runner] -= selected_sum;
    }
  }
}

SM4_VECTOR_CLONES void route_backward_float(const BackwardBlock<float>& b, TokenScratch<float>& s) {
  route_backward_block(b, s);
}
void route_backward_double(const BackwardBlock<double>& b, TokenScratch<double>& s) { route_backward_block(b, s); }
void route_backward(const BackwardBlock<float>& b, TokenScratch<float>& s) { route_backward_float(b, s); }
void route_backward(const BackwardBlock<double>& b, TokenScratch<double>& s) { route_backward_double(b, s); }

at::Tensor topk_gating_backward_cpu(const at::Tensor& grad_gates, const at::Tensor& grad_importance,
                                    const at::Tensor& grad_load, const at::Tensor& logits,
                                    const std::optional<at::Tensor>& noise, const at::Tensor& expert_ids,
                                    const at::Tensor& runner_up, double sigma, bool renormalize) {
  const char* op = "sm4.topk_gating_backward";
  const KernelScope scope;
  check_shape(logits, {-1, -1}, op, "logits", "(T, E), the forward's");
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble, op,
                   ": logits must be the forward's float32 or float64 logits, got ", logits.scalar_type());
  const int64_t T = logits.size(0), E = logits.size(1);
  check_shape(expert_ids, {T, -1}, op, "expert_ids", "(T, k), T from logits");
  check_index_dtype(expert_ids, op, "expert_ids");
  const int64_t k = expert_ids.size(1);
  TORCH_CHECK_VALUE(k >= 1, op, ": expert_ids must have k >= 1 columns, got shape ", expert_ids.sizes());
  check_shape(grad_gates, {T, k}, op, "grad_gates", "(T, k), as expert_ids");
  check_shape(grad_importance, {E}, op, "grad_importance", "(E,), E from logits");
  check_shape(grad_load, {E}, op, "grad_load", "(E,), E from logits");
  check_shape(runner_up, {T}, op, "runner_up", "(T,), T from logits");
  check_index_dtype(runner_up, op, "runner_up");
  check_floating(grad_gates, op, "grad_gates");
  check_floating(grad_importance, op, "grad_importance");
  check_floating(grad_load, op, "grad_load");
  const auto acc = logits.scalar_type();
  const at::Tensor clean_all = logits.contiguous();
  at::Tensor eps;
  if (sigma > 0) {
    TORCH_CHECK_VALUE(noise.has_value(), op, ": sigma = ", sigma, " > 0 needs the noise tensor, got noise = None");
    check_shape(*noise, {T, E}, op, "noise", "(T, E)");
    check_floating(*noise, op, "noise");
    eps = noise->to(acc).contiguous();
  }
  const at::Tensor d_gates = grad_gates.to(acc).contiguous();
  const at::Tensor d_importance = grad_importance.to(acc).contiguous();
  const at::Tensor d_load = grad_load.to(acc).contiguous();
  const at::Tensor ids_all = expert_ids.to(at::kLong).contiguous(), runners = runner_up.to(at::kLong).contiguous();
  // The per-token pass indexes (E,) arrays with these ids, and with noise reads the last selected
  // expert: every token has one (its first id; the forward gives each token k_t >= 1 experts).
  check_values_in(ids_all.data_ptr<int64_t>(), ids_all.numel(), -1, E, op, "expert_ids");
  check_values_in(runners.data_ptr<int64_t>(), runners.numel(), -1, E, op, "runner_up");
  {  // each token's first id, read in place with stride k (no copy of the column); the pass above
     // bounded every id by [-1, E), so only a -1 can be wrong here
    const int64_t* ids = ids_all.data_ptr<int64_t>();
    int64_t lowest = 0;
    for (int64_t t = 0; t < T; ++t) lowest = ids[t * k] < lowest ? ids[t * k] : lowest;
    for (int64_t t = 0; lowest < 0 && t < T; ++t)
      TORCH_CHECK_VALUE(ids[t * k] >= 0, op, ": expert_ids[:, 0] (each token's first expert) values must lie in [0, ", E,
                        "), but flat entry ", t, " is ", ids[t * k]);
  }
  at::Tensor grad_logits = at::empty({T, E}, logits.options());

  AT_DISPATCH_FLOATING_TYPES(acc, "topk_gating_backward_cpu", [&] {
    using acc_t = scalar_t;
    at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
      TokenScratch<acc_t> scratch(E);
      BackwardBlock<acc_t> block{
          t1 - t0,
          E,
          k,
          static_cast<acc_t>(sigma),
          renormalize,
          clean_all.data_ptr<acc_t>() + t0 * E,
          sigma > 0 ? eps.data_ptr<acc_t>() + t0 * E : nullptr,
          ids_all.data_ptr<int64_t>() + t0 * k,
          runners.data_ptr<int64_t>() + t0,
          d_gates.data_ptr<acc_t>() + t0 * k,
          d_importance.data_ptr<acc_t>(),
          d_load.data_ptr<acc_t>(),
          grad_logits.data_ptr<acc_t>() + t0 * E,
      };
      route_backward(block, scratch);
    });
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(sm4, CPU, m) {
  m.impl("topk_gating_forward", &topk_gating_forward_cpu);
  m.impl("topk_gating_backward", &topk_gating_backward_cpu);
}

}  // namespace sm4
