// Per-element math of the neuron_graphs op, shared by the CPU and CUDA back ends (and mirrored by
// onp_fast/ops/reference.py), so every back end takes the same decisions on the same doubles.
// No torch headers here: plain C++ that nvcc and g++ both compile.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define ONP_NG_HD __host__ __device__ __forceinline__
#else
#define ONP_NG_HD inline
#endif

namespace onp_fast {
namespace ng {

// One layer's shape: weight [cout, cin, kh, kw] (a linear weight has kh = kw = 1), its element strides, and
// the global id of its neuron 0.
struct NgLayer {
  int64_t cout, cin, kh, kw;
  int64_t s0, s1, s2, s3;
  int64_t offset;
};

// Slack on the cosine test so that exactly parallel neurons pass eps = 1 despite rounding.
constexpr double kCosSlack = 1e-9;
// Columns of node_features: [l1, mean, max, std, active].
constexpr int kNumFeatures = 5;

// torch.lerp's formula (exactly), used for the linear-interpolation quantile.
ONP_NG_HD double lerp(double a, double b, double w) {
  return w < 0.5 ? a + w * (b - a) : b - (b - a) * (1.0 - w);
}

// Quantile position of `quantile` in [0, 1] over n >= 1 sorted values: indices lo <= hi and weight w.
ONP_NG_HD void quantile_position(double quantile, int64_t n, int64_t& lo, int64_t& hi, double& w) {
  const double pos = quantile * static_cast<double>(n - 1);
  lo = static_cast<int64_t>(floor(pos));
  hi = static_cast<int64_t>(ceil(pos));
  if (hi > n - 1) hi = n - 1;
  if (lo > hi) lo = hi;
  w = pos - static_cast<double>(lo);
}

// A neuron is dormant when its L1 strength is below the layer's threshold, or exactly zero.
ONP_NG_HD bool is_dormant(double l1, double threshold) { return l1 < threshold || l1 == 0.0; }

// Cosine from a Gram entry and the two norms, clamped to [-1, 1].
ONP_NG_HD double cosine(double dot, double norm_i, double norm_j) {
  double c = dot / (norm_i * norm_j);
  return c < -1.0 ? -1.0 : (c > 1.0 ? 1.0 : c);
}

// Intra-layer edge test on a clamped cosine.
ONP_NG_HD bool is_edge(double cos, double eps) { return cos >= eps - kCosSlack; }

// Statistics of one connection-strength row q [n] (doubles, n >= 1): L1 (= sum, q >= 0), mean, max and
// population std (two passes).
ONP_NG_HD void row_stats(const double* q, int64_t n, double& l1, double& mean, double& mx, double& sd) {
  double s = 0.0, m = q[0];
  for (int64_t c = 0; c < n; ++c) {
    s += q[c];
    m = q[c] > m ? q[c] : m;
  }
  const double mu = s / static_cast<double>(n);
  double v = 0.0;
  for (int64_t c = 0; c < n; ++c) {
    const double d = q[c] - mu;
    v += d * d;
  }
  l1 = s;
  mean = mu;
  mx = m;
  sd = sqrt(v / static_cast<double>(n));
}

// Row features of one neuron from q [n]: writes its L1 to *l1 and feat[0..3] = L1, mean, max, std (feat[4],
// the active flag, is written once the dormant threshold is known).
ONP_NG_HD void row_features(const double* q, int64_t n, double* l1, float* feat) {
  double s, mean, mx, sd;
  row_stats(q, n, s, mean, mx, sd);
  *l1 = s;
  feat[0] = static_cast<float>(s);
  feat[1] = static_cast<float>(mean);
  feat[2] = static_cast<float>(mx);
  feat[3] = static_cast<float>(sd);
}

// Cross-layer top-k order: a before b when it is heavier, ties broken by the smaller index.
ONP_NG_HD bool ranks_before(double wa, int64_t ia, double wb, int64_t ib) {
  return wa > wb || (wa == wb && ia < ib);
}

// Number of cross-layer edges of one row q [n]: min(k, number of positive entries).
ONP_NG_HD int64_t topk_count(const double* q, int64_t n, int64_t k) {
  int64_t pos = 0;
  for (int64_t c = 0; c < n && pos < k; ++c) pos += q[c] > 0.0 ? 1 : 0;
  return pos;
}

// The next pick of the top-k selection over q [n]: the first positive entry in `ranks_before` order that
// ranks strictly after the previous pick (prev_i < 0: no previous pick). Returns -1 when none is left.
// Selection (O(n) per pick, no scratch memory) gives the same order as a sort.
ONP_NG_HD int64_t topk_next(const double* q, int64_t n, double prev_w, int64_t prev_i) {
  int64_t best = -1;
  double best_w = 0.0;
  for (int64_t c = 0; c < n; ++c) {
    const double w = q[c];
    if (!(w > 0.0)) continue;
    if (prev_i >= 0 && !ranks_before(prev_w, prev_i, w, c)) continue;
    if (best < 0 || ranks_before(w, c, best_w, best)) {
      best = c;
      best_w = w;
    }
  }
  return best;
}

}  // namespace ng
}  // namespace onp_fast
