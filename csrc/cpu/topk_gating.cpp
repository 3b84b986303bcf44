// CPU kernels of sm4::topk_gating_forward / topk_gating_backward (SM4_SPEC §2).
//
// Tokens are processed in fixed blocks (token_block(d) tokens), in parallel over blocks. For each block the
// router logits come from one small GEMM (at::mm on a cache-resident block, so the (T, E) logits
// never travel through memory), then each token's routing is computed in one pass: noise, softmax,
// top-k with ties to the lower index, per-token k, gates, entropy, and its contributions to the
// importance / load / count sums. Those sums are kept per block and added up in block order at
// the end, so the result does not depend on the number of threads.
//
// The forward also returns the clean logits (4 bytes per token and expert) so that the backward,
// a per-token pass that returns d loss / d logits, needs neither the router GEMM nor x; the caller
// turns d logits into grad_x and grad_W with two matmuls.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "../checks.h"

namespace sm4 {
namespace {

// Tokens per block: about 16k elements of x per GEMM (64 tokens at d = 256 and above, up to 256
// at small d), large enough that the per-block GEMM call costs little next to its work, small
// enough that the block and its logits stay in L2 while the per-token pass reads them. It depends
// only on d, so the block partial sums, and hence the results, are the same on every run.
int64_t token_block(int64_t dim) { return std::clamp<int64_t>(16384 / std::max<int64_t>(dim, 1), 64, 256); }

template <typename acc_t>
acc_t normal_cdf(acc_t z) {
  // |z| > 9: Phi is within 1e-19 of 0 or 1, below fp32 and fp64 resolution of the load sums;
  // with sigma = noise_std / E most experts land there, and erfc is the costliest call per expert.
  if (z < acc_t(-9)) return acc_t(0);
  if (z > acc_t(9)) return acc_t(1);
  return acc_t(0.5) * std::erfc(-z * acc_t(0.70710678118654752440));
}

template <typename acc_t>
acc_t normal_pdf(acc_t z) {
  // Same cut as normal_cdf: past |z| = 9 the density is below 1e-18 (and mostly skipped).
  if (z < acc_t(-9) || z > acc_t(9)) return acc_t(0);
  return acc_t(0.39894228040143267794) * std::exp(acc_t(-0.5) * z * z);
}

// Multi-versioned hot loops: the loader picks the AVX2 clone where the CPU has it, so one build
// runs everywhere and still uses 8-wide vectors.
// finite-math-only lets fmaxf vectorise; the inputs of these loops are finite by construction
// (non-finite tokens are handled before them).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SM4_VECTOR_CLONES __attribute__((target_clones("avx2", "default"), optimize("finite-math-only")))
#else
#define SM4_VECTOR_CLONES
#endif

// out[i] = exp(in[i] - shift) for in[i] - shift in [-87, 0] (a softmax numerator). Cephes-style:
// exp(x) = 2^n * exp(r), r = x - n ln2 in [-ln2/2, ln2/2], exp(r) by a degree-6 polynomial
// (relative error < 2 ulp); written branch-free so that the compiler vectorises it.
SM4_VECTOR_CLONES
void exp_shifted(const float* __restrict__ in, float shift, float* __restrict__ out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = __builtin_fmaxf(in[i] - shift, -87.0f);
    // Round to nearest by adding and removing 1.5 * 2^23 (no libm call, so it vectorises).
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
    out[i] = p * scale;
  }
}

void exp_shifted(const double* in, double shift, double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = std::exp(in[i] - shift);
}

// The first `count` entries of `order` become the experts with the largest noisy logits, by
// (logit descending, index ascending): a strict total order, so equal logits go to the lower index.
// For a few ranks, one pass keeps the best `count` in a small sorted list: most experts fail the
// first comparison (against the current last place), so the pass costs about one compare each.
// A later expert enters only if strictly greater, so equal logits keep the lower index first.
template <typename acc_t>
void rank_experts(const acc_t* noisy, int64_t num_experts, int64_t count, int64_t* order, acc_t* best) {
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
}

// Reductions over a token's experts with 8 independent lanes combined in a fixed order: the same
// result on every run (unlike a compiler reassociation), and no serial chain of dependent adds.
template <typename acc_t>
acc_t lane_sum(const acc_t* v, int64_t n) {
  acc_t lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) lanes[j] += v[i + j];
  for (; i < n; ++i) lanes[i % 8] += v[i];
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

template <typename acc_t>
acc_t lane_max(const acc_t* v, int64_t n) {
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

// softmax(values) into out; also returns the max and log of the partition function relative to it.
template <typename acc_t>
void softmax(const acc_t* values, int64_t n, acc_t* out, acc_t& max_value, acc_t& log_partition) {
  max_value = lane_max(values, n);
  exp_shifted(values, max_value, out, n);
  const acc_t partition = lane_sum(out, n);
  const acc_t inverse = acc_t(1) / partition;
  for (int64_t e = 0; e < n; ++e) out[e] *= inverse;
  log_partition = std::log(partition);
}

// Logits of tokens [t0, t1) in the accumulation type. Rows of x that are not all finite are
// zeroed first (so NaN * 0 can never reach a shared result) and flagged in `finite`; a row whose
// logits overflow is flagged too.
at::Tensor block_logits(const at::Tensor& x, const at::Tensor& weight, int64_t t0, int64_t t1,
                        std::vector<char>& finite) {
  at::Tensor block = at::empty({t1 - t0, x.size(1)}, weight.options());
  block.copy_(x.slice(0, t0, t1));
  AT_DISPATCH_FLOATING_TYPES(block.scalar_type(), "block_logits", [&] {
    scalar_t* rows = block.data_ptr<scalar_t>();
    const int64_t dim = block.size(1);
    for (int64_t i = 0; i < t1 - t0; ++i) {
      scalar_t* row = rows + i * dim;
      finite[i] = std::all_of(row, row + dim, [](scalar_t v) { return std::isfinite(v); });
      if (!finite[i]) std::fill(row, row + dim, scalar_t(0));
    }
  });
  at::Tensor logits = at::mm(block, weight);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "block_logits_check", [&] {
    const scalar_t* values = logits.data_ptr<scalar_t>();
    const int64_t experts = logits.size(1);
    for (int64_t i = 0; i < t1 - t0; ++i) {
      const scalar_t* row = values + i * experts;
      finite[i] = finite[i] && std::all_of(row, row + experts, [](scalar_t v) { return std::isfinite(v); });
    }
  });
  return logits;
}

struct GatingInputs {
  at::Tensor x, weight, noise, token_k;  // weight and noise in the accumulation type, contiguous
  int64_t num_tokens, num_experts, k;
};

GatingInputs prepare(const at::Tensor& x, const at::Tensor& router_weight,
                     const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& token_k,
                     int64_t k, double sigma, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be (T, d), got ", x.dim(), " dims");
  TORCH_CHECK(router_weight.dim() == 2 && router_weight.size(0) == x.size(1), op,
              ": router_weight must be (d, E) with d = ", x.size(1), ", got ", router_weight.sizes());
  TORCH_CHECK(x.is_floating_point() && router_weight.is_floating_point(), op, ": x and router_weight must be floating point");
  const int64_t num_experts = router_weight.size(1);
  TORCH_CHECK(num_experts >= 1 && k >= 1 && k <= num_experts, op, ": need 1 <= k <= E, got k = ", k, ", E = ", num_experts);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  GatingInputs in{x, router_weight.to(acc).contiguous(), at::Tensor(), at::Tensor(), x.size(0), num_experts, k};
  if (sigma > 0) {
    TORCH_CHECK(noise.has_value(), op, ": sigma > 0 needs the noise tensor");
    TORCH_CHECK(noise->dim() == 2 && noise->size(0) == x.size(0) && noise->size(1) == num_experts, op,
                ": noise must be (T, E), got ", noise->sizes());
    in.noise = noise->to(acc).contiguous();
  }
  if (token_k.has_value()) {
    TORCH_CHECK(token_k->dim() == 1 && token_k->size(0) == x.size(0), op, ": token_k must be (T,), got ", token_k->sizes());
    // Out-of-range values are clamped (the Python API rejects them before they get here).
    in.token_k = token_k->to(at::kLong).clamp(1, k).contiguous();
  }
  return in;
}

template <typename acc_t>
struct TokenScratch {
  std::vector<acc_t> noisy, probs, extra;
  std::vector<int64_t> order;
  std::vector<char> selected;
  explicit TokenScratch(int64_t experts)
      : noisy(experts), probs(experts), extra(experts), order(experts), selected(experts) {}
};

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

  AT_DISPATCH_FLOATING_TYPES(in.weight.scalar_type(), "topk_gating_forward_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t sig = static_cast<acc_t>(sigma);
    const bool noisy_routing = sigma > 0;
    const acc_t* noise_ptr = noisy_routing ? in.noise.data_ptr<acc_t>() : nullptr;
    const int64_t* token_k_ptr = in.token_k.defined() ? in.token_k.data_ptr<int64_t>() : nullptr;
    const int64_t ranked = std::min(k + 1, E);
    at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
      TokenScratch<acc_t> s(E);
      std::vector<char> finite(block_tokens);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t t0 = b * block_tokens, t1 = std::min(T, t0 + block_tokens);
        const at::Tensor logits_block = block_logits(in.x, in.weight, t0, t1, finite);
        const acc_t* logits = logits_block.data_ptr<acc_t>();
        acc_t* importance = block_importance.data_ptr<acc_t>() + b * E;
        acc_t* load = block_load.data_ptr<acc_t>() + b * E;
        int64_t* counts = block_counts.data_ptr<int64_t>() + b * E;
        for (int64_t t = t0; t < t1; ++t) {
          const acc_t* clean = logits + (t - t0) * E;
          const int64_t kt = token_k_ptr ? token_k_ptr[t] : k;
          int64_t* ids = expert_ids.data_ptr<int64_t>() + t * k;
          acc_t* token_gates = gates.data_ptr<acc_t>() + t * k;
          acc_t* saved = saved_logits.data_ptr<acc_t>() + t * E;
          if (!finite[t - t0]) {
            // Routed as if every logit were equal; NaN gates, entropy and saved logits; not in
            // importance/load.
            std::fill(saved, saved + E, std::numeric_limits<acc_t>::quiet_NaN());
            for (int64_t r = 0; r < k; ++r) {
              ids[r] = r < kt ? r : -1;
              token_gates[r] = r < kt ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(0);
              if (r < kt) ++counts[r];
            }
            entropy.data_ptr<acc_t>()[t] = std::numeric_limits<acc_t>::quiet_NaN();
            runner_up.data_ptr<int64_t>()[t] = -1;
            continue;
          }
          std::copy(clean, clean + E, saved);
          for (int64_t e = 0; e < E; ++e)
            s.noisy[e] = noisy_routing ? clean[e] + sig * noise_ptr[t * E + e] : clean[e];
          rank_experts(s.noisy.data(), E, ranked, s.order.data(), s.extra.data());
          // The smooth load's thresholds: the (k_t + 1)-th noisy logit for selected experts (none
          // when k_t = E), the k_t-th for the others.
          const acc_t threshold_selected =
              kt < E ? s.noisy[s.order[kt]] : -std::numeric_limits<acc_t>::infinity();
          const acc_t threshold_unselected = s.noisy[s.order[kt - 1]];
          acc_t noisy_max, noisy_log_partition;
          softmax(s.noisy.data(), E, s.probs.data(), noisy_max, noisy_log_partition);

          acc_t active_sum = 0;
          for (int64_t r = 0; r < kt; ++r) active_sum += s.probs[s.order[r]];
          const acc_t scale = renormalize ? acc_t(1) / active_sum : acc_t(1);
          std::fill(s.selected.begin(), s.selected.end(), 0);
          for (int64_t r = 0; r < k; ++r) {
            const bool active = r < kt;
            ids[r] = active ? s.order[r] : -1;
            token_gates[r] = active ? s.probs[s.order[r]] * scale : acc_t(0);
            if (active) s.selected[s.order[r]] = 1;
          }
          runner_up.data_ptr<int64_t>()[t] = kt < E ? s.order[kt] : -1;

          // Clean softmax (importance, entropy): the noisy one when there is no noise.
          acc_t clean_max = noisy_max, clean_log_partition = noisy_log_partition;
          const acc_t* q = s.probs.data();
          if (noisy_routing) {
            softmax(clean, E, s.extra.data(), clean_max, clean_log_partition);
            q = s.extra.data();
          }
          // H = -sum q log q with log q_e = (l_e - max) - log Z: no per-expert log.
          for (int64_t e = 0; e < E; ++e) s.noisy[e] = q[e] * (clean[e] - clean_max);  // noisy is free now
          entropy.data_ptr<acc_t>()[t] = clean_log_partition - lane_sum(s.noisy.data(), E);

          for (int64_t e = 0; e < E; ++e) {
            importance[e] += q[e];
            counts[e] += s.selected[e];
            if (noisy_routing) {
              const acc_t threshold = s.selected[e] ? threshold_selected : threshold_unselected;
              load[e] += normal_cdf((clean[e] - threshold) / sig);
            } else {
              load[e] += s.selected[e];
            }
          }
        }
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

at::Tensor topk_gating_backward_cpu(const at::Tensor& grad_gates, const at::Tensor& grad_importance,
                                    const at::Tensor& grad_load, const at::Tensor& logits,
                                    const std::optional<at::Tensor>& noise, const at::Tensor& expert_ids,
                                    const at::Tensor& runner_up, double sigma, bool renormalize) {
  const char* op = "sm4.topk_gating_backward";
  const KernelScope scope;
  TORCH_CHECK(logits.dim() == 2 && logits.is_floating_point(), op, ": logits must be the forward's (T, E) logits");
  const int64_t T = logits.size(0), E = logits.size(1), k = expert_ids.size(1);
  const auto acc = logits.scalar_type();
  const at::Tensor clean_all = logits.contiguous();
  at::Tensor eps;
  if (sigma > 0) {
    TORCH_CHECK(noise.has_value() && noise->dim() == 2 && noise->size(0) == T && noise->size(1) == E, op,
                ": sigma > 0 needs the (T, E) noise tensor");
    eps = noise->to(acc).contiguous();
  }
  const at::Tensor d_gates = grad_gates.to(acc).contiguous();
  const at::Tensor d_importance = grad_importance.to(acc).contiguous();
  const at::Tensor d_load = grad_load.to(acc).contiguous();
  const at::Tensor ids_all = expert_ids.contiguous(), runners = runner_up.contiguous();
  at::Tensor grad_logits = at::empty({T, E}, logits.options());

  AT_DISPATCH_FLOATING_TYPES(acc, "topk_gating_backward_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t sig = static_cast<acc_t>(sigma);
    const bool noisy_routing = sigma > 0;
    const acc_t* noise_ptr = noisy_routing ? eps.data_ptr<acc_t>() : nullptr;
    const acc_t* dI = d_importance.data_ptr<acc_t>();
    const acc_t* dL = d_load.data_ptr<acc_t>();
    at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
      TokenScratch<acc_t> s(E);
      std::vector<acc_t> d_probs(E);
      for (int64_t t = t0; t < t1; ++t) {
        acc_t* dl = grad_logits.data_ptr<acc_t>() + t * E;
        const acc_t* clean = clean_all.data_ptr<acc_t>() + t * E;
        std::fill(dl, dl + E, acc_t(0));
        // A non-finite token (saved as a NaN row) contributes no gradient.
        if (!std::all_of(clean, clean + E, [](acc_t v) { return std::isfinite(v); })) continue;
        const int64_t* ids = ids_all.data_ptr<int64_t>() + t * k;
        const acc_t* dg = d_gates.data_ptr<acc_t>() + t * k;
        int64_t kt = 0;
        while (kt < k && ids[kt] >= 0) ++kt;
        for (int64_t e = 0; e < E; ++e)
          s.noisy[e] = noisy_routing ? clean[e] + sig * noise_ptr[t * E + e] : clean[e];
        acc_t unused_max, unused_log_partition;
        softmax(s.noisy.data(), E, s.probs.data(), unused_max, unused_log_partition);

        // Gates -> noisy probabilities (through the optional renormalisation).
        std::fill(d_probs.begin(), d_probs.end(), acc_t(0));
        if (renormalize) {
          acc_t active_sum = 0, dot = 0;
          for (int64_t r = 0; r < kt; ++r) active_sum += s.probs[ids[r]];
          for (int64_t r = 0; r < kt; ++r) dot += dg[r] * s.probs[ids[r]] / active_sum;
          for (int64_t r = 0; r < kt; ++r) d_probs[ids[r]] += (dg[r] - dot) / active_sum;
        } else {
          for (int64_t r = 0; r < kt; ++r) d_probs[ids[r]] += dg[r];
        }
        // Softmax backward (noise is additive, so d noisy = d clean logits).
        for (int64_t e = 0; e < E; ++e) s.extra[e] = s.probs[e] * d_probs[e];
        const acc_t dot = lane_sum(s.extra.data(), E);
        for (int64_t e = 0; e < E; ++e) dl[e] = s.probs[e] * (d_probs[e] - dot);

        // Importance = sum of the clean softmax.
        const acc_t* q = s.probs.data();
        if (noisy_routing) {
          softmax(clean, E, s.extra.data(), unused_max, unused_log_partition);
          q = s.extra.data();
        }
        acc_t q_dot = 0;
        for (int64_t e = 0; e < E; ++e) q_dot += q[e] * dI[e];
        for (int64_t e = 0; e < E; ++e) dl[e] += q[e] * (dI[e] - q_dot);

        // Smooth load: Phi((l_e - n_j) / sigma), j the threshold expert of e.
        if (noisy_routing) {
          std::fill(s.selected.begin(), s.selected.end(), 0);
          for (int64_t r = 0; r < kt; ++r) s.selected[ids[r]] = 1;
          const int64_t runner = runners.data_ptr<int64_t>()[t];
          const int64_t last_selected = ids[kt - 1];
          for (int64_t e = 0; e < E; ++e) {
            const int64_t j = s.selected[e] ? runner : last_selected;
            if (j < 0) continue;  // k_t = E: the expert is selected whatever the noise
            const acc_t a = normal_pdf((clean[e] - s.noisy[j]) / sig) / sig * dL[e];
            dl[e] += a;
            dl[j] -= a;
          }
        }
      }
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
