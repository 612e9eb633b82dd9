// CPU implementation of neuron_graphs: parallel over layers and rows (at::parallel_for), two passes
// (count, exclusive prefix sum, emit) so the edge order is deterministic whatever the thread count.
#include "cpu/neuron_graphs_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <sstream>

#include "common/neuron_graphs.h"

namespace onp_fast {
namespace {

constexpr int64_t kGramRows = 256;  // rows per Gram block: few BLAS calls (each is a parallel region)

std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

// Layer index of global row `row` (offsets ascending).
size_t layer_of(const std::vector<NgLayer>& layers, int64_t row) {
  size_t lo = 0, hi = layers.size();
  while (hi - lo > 1) {
    size_t mid = (lo + hi) / 2;
    if (layers[mid].offset <= row) lo = mid; else hi = mid;
  }
  return lo;
}

// q [cin] of neuron i: q[c] = sum over kernel positions of |W[i, c, y, x]|, in double.
template <typename T>
void q_row(const T* w, const NgLayer& L, int64_t i, double* q) {
  const T* wi = w + i * L.s0;
  const bool dense_kernel = L.s3 == 1 && L.s2 == L.kw;
  const int64_t kk = L.kh * L.kw;
  for (int64_t c = 0; c < L.cin; ++c) {
    const T* wc = wi + c * L.s1;
    double acc = 0.0;
    if (dense_kernel) {
      for (int64_t k = 0; k < kk; ++k) acc += std::abs(static_cast<double>(static_cast<float>(wc[k])));
    } else {
      for (int64_t y = 0; y < L.kh; ++y)
        for (int64_t x = 0; x < L.kw; ++x)
          acc += std::abs(static_cast<double>(static_cast<float>(wc[y * L.s2 + x * L.s3])));
    }
    q[c] = acc;
  }
}

}  // namespace

std::vector<NgLayer> neuron_graphs_check_args(const std::vector<at::Tensor>& weights, double eps,
                                              double dormant_quantile, int64_t cross_layer_topk) {
  TORCH_CHECK_VALUE(!weights.empty(), "neuron_graphs: weights is an empty list (need at least one layer)");
  TORCH_CHECK_VALUE(eps >= -1.0 && eps <= 1.0, "neuron_graphs: eps must be in [-1, 1], got ", eps);
  TORCH_CHECK_VALUE(dormant_quantile >= 0.0 && dormant_quantile <= 1.0,
                    "neuron_graphs: dormant_quantile must be in [0, 1], got ", dormant_quantile);
  TORCH_CHECK_VALUE(cross_layer_topk >= 0, "neuron_graphs: cross_layer_topk must be >= 0, got ",
                    cross_layer_topk);
  const auto dtype = weights[0].scalar_type();
  const auto device = weights[0].device();
  std::vector<NgLayer> layers;
  layers.reserve(weights.size());
  int64_t offset = 0;
  for (size_t l = 0; l < weights.size(); ++l) {
    const at::Tensor& w = weights[l];
    TORCH_CHECK_VALUE(w.defined(), "neuron_graphs: layer ", l, " weight is undefined");
    TORCH_CHECK_VALUE(w.scalar_type() == at::kFloat || w.scalar_type() == at::kHalf ||
                          w.scalar_type() == at::kBFloat16,
                      "neuron_graphs: layer ", l, " has dtype ", w.scalar_type(),
                      "; expected float32, float16 or bfloat16");
    TORCH_CHECK_VALUE(w.scalar_type() == dtype, "neuron_graphs: mixed dtypes: layer ", l, " is ",
                      w.scalar_type(), " but layer 0 is ", dtype);
    TORCH_CHECK_VALUE(w.device() == device, "neuron_graphs: mixed devices: layer ", l, " is on ", w.device(),
                      " but layer 0 is on ", device);
    TORCH_CHECK_VALUE(w.dim() == 2 || w.dim() == 4, "neuron_graphs: layer ", l,
                      " weight must be 2-D [C_out, C_in] or 4-D [C_out, C_in, kh, kw], got ", w.dim(),
                      "-D shape ", shape_str(w));
    TORCH_CHECK_VALUE(w.size(0) > 0, "neuron_graphs: layer ", l, " has zero neurons (shape ", shape_str(w), ")");
    TORCH_CHECK_VALUE(w.numel() > 0, "neuron_graphs: layer ", l, " weight is empty (shape ", shape_str(w), ")");
    NgLayer L;
    L.cout = w.size(0);
    L.cin = w.size(1);
    L.s0 = w.stride(0);
    L.s1 = w.stride(1);
    if (w.dim() == 4) {
      L.kh = w.size(2);
      L.kw = w.size(3);
      L.s2 = w.stride(2);
      L.s3 = w.stride(3);
    } else {
      L.kh = L.kw = 1;
      L.s2 = L.s3 = 1;
    }
    L.offset = offset;
    offset += L.cout;
    layers.push_back(L);
  }
  return layers;
}

void neuron_graphs_check_finite(const double* l1, const std::vector<NgLayer>& layers) {
  for (size_t l = 0; l < layers.size(); ++l) {
    for (int64_t i = 0; i < layers[l].cout; ++i) {
      TORCH_CHECK_VALUE(std::isfinite(l1[layers[l].offset + i]), "neuron_graphs: layer ", l,
                        " weight contains NaN or inf (neuron ", i, ")");
    }
  }
}

std::pair<at::Tensor, at::Tensor> neuron_graphs_node_index(const std::vector<NgLayer>& layers) {
  const int64_t L = static_cast<int64_t>(layers.size());
  const int64_t N = layers.back().offset + layers.back().cout;
  at::Tensor node_layer = at::empty({N}, at::kLong);
  at::Tensor offsets = at::empty({L + 1}, at::kLong);
  int64_t* nl = node_layer.data_ptr<int64_t>();
  int64_t* off = offsets.data_ptr<int64_t>();
  for (int64_t l = 0; l < L; ++l) {
    off[l] = layers[l].offset;
    std::fill(nl + layers[l].offset, nl + layers[l].offset + layers[l].cout, l);
  }
  off[L] = N;
  return {node_layer, offsets};
}

NeuronGraphsOut neuron_graphs_cpu(const std::vector<at::Tensor>& weights, double eps, double dormant_quantile,
                                  int64_t cross_layer_topk) {
  const std::vector<NgLayer> layers = neuron_graphs_check_args(weights, eps, dormant_quantile, cross_layer_topk);
  const size_t L = layers.size();
  const int64_t N = layers.back().offset + layers.back().cout;
  const auto f64 = at::TensorOptions().dtype(at::kDouble);

  // Stage 1: q [cout, cin] per layer (double) and per-row statistics, parallel over all rows.
  std::vector<at::Tensor> Q(L);
  std::vector<double*> qp(L);
  for (size_t l = 0; l < L; ++l) {
    Q[l] = at::empty({layers[l].cout, layers[l].cin}, f64);
    qp[l] = Q[l].data_ptr<double>();
  }
  at::Tensor features = at::empty({N, ng::kNumFeatures}, at::kFloat);
  float* feat = features.data_ptr<float>();
  std::vector<double> l1(N);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "neuron_graphs_q", [&] {
    std::vector<const scalar_t*> wp(L);
    for (size_t l = 0; l < L; ++l) wp[l] = weights[l].const_data_ptr<scalar_t>();
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const size_t l = layer_of(layers, row);
        const NgLayer& Ly = layers[l];
        const int64_t i = row - Ly.offset;
        double* q = qp[l] + i * Ly.cin;
        q_row(wp[l], Ly, i, q);
        ng::row_features(q, Ly.cin, l1.data() + row, feat + row * ng::kNumFeatures);
      }
    });
  });
  neuron_graphs_check_finite(l1.data(), layers);

  // Stage 2: dormant threshold per layer (linear-interpolation quantile of the L1 norms), active flags.
  // Sequential: N log N on N doubles is cheaper than a parallel region.
  std::vector<uint8_t> active(N);
  for (size_t l = 0; l < L; ++l) {
    const NgLayer& Ly = layers[l];
    std::vector<double> sorted(l1.begin() + Ly.offset, l1.begin() + Ly.offset + Ly.cout);
    std::sort(sorted.begin(), sorted.end());
    int64_t lo, hi;
    double w;
    ng::quantile_position(dormant_quantile, Ly.cout, lo, hi, w);
    const double t = ng::lerp(sorted[lo], sorted[hi], w);
    for (int64_t i = 0; i < Ly.cout; ++i) {
      const int64_t row = Ly.offset + i;
      active[row] = ng::is_dormant(l1[row], t) ? 0 : 1;
      feat[row * ng::kNumFeatures + 4] = active[row] ? 1.0f : 0.0f;
    }
  }

  // Stage 3: upper triangles of the Gram matrices G = Q Q^T (double BLAS, one call per block of rows; BLAS
  // threads itself: calling it from inside at::parallel_for measured far slower) and norms from the diagonals.
  std::vector<at::Tensor> G(L);
  std::vector<const double*> gp(L);
  struct Block { size_t l; int64_t r0, r1; };
  std::vector<Block> blocks;
  for (size_t l = 0; l < L; ++l) {
    const int64_t n = layers[l].cout;
    G[l] = at::empty({n, n}, f64);
    gp[l] = G[l].const_data_ptr<double>();
    for (int64_t r0 = 0; r0 < n; r0 += kGramRows) {
      const int64_t r1 = std::min(n, r0 + kGramRows);
      blocks.push_back({l, r0, r1});
    }
  }
  for (const Block& B : blocks) {
    const int64_t n = layers[B.l].cout;
    at::Tensor out = G[B.l].narrow(0, B.r0, B.r1 - B.r0).narrow(1, B.r0, n - B.r0);
    at::mm_out(out, Q[B.l].narrow(0, B.r0, B.r1 - B.r0), Q[B.l].narrow(0, B.r0, n - B.r0).t());
  }
  std::vector<double> norm(N);
  for (size_t l = 0; l < L; ++l) {
    const int64_t n = layers[l].cout;
    for (int64_t i = 0; i < n; ++i) norm[layers[l].offset + i] = std::sqrt(gp[l][i * n + i]);
  }

  // Stage 4: count edges per row (intra rows [0, N), cross rows [N, 2N)), exclusive prefix sum.
  std::vector<int64_t> start(2 * N + 1, 0);
  auto intra_row = [&](int64_t row, auto&& visit) {
    const size_t l = layer_of(layers, row);
    const NgLayer& Ly = layers[l];
    const int64_t i = row - Ly.offset, n = Ly.cout;
    if (!active[row]) return l;
    const double* g = gp[l] + i * n;
    const double ni = norm[row];
    for (int64_t j = 0; j < n; ++j) {
      const int64_t col = Ly.offset + j;
      if (j == i || !active[col]) continue;
      const double dot = j >= i ? g[j] : gp[l][j * n + i];  // upper triangle only
      const double c = ng::cosine(dot, ni, norm[col]);
      if (ng::is_edge(c, eps)) visit(col, c);
    }
    return l;
  };
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      int64_t cnt = 0;
      const size_t l = intra_row(row, [&](int64_t, double) { ++cnt; });
      start[row + 1] = cnt;
      if (ng_chains(layers, l, cross_layer_topk)) {
        const int64_t i = row - layers[l].offset;
        start[N + row + 1] = ng::topk_count(qp[l] + i * layers[l].cin, layers[l].cin, cross_layer_topk);
      }
    }
  });
  for (int64_t r = 0; r < 2 * N; ++r) start[r + 1] += start[r];
  const int64_t E = start[2 * N];

  // Stage 5: emit. Intra edges (src = row, dst = col, weight = cos), then cross edges (src = neuron j of
  // layer l, dst = neuron i of layer l - 1, weight = ||W_l[j, i]||_1) in order l, j, rank.
  at::Tensor edge_index = at::empty({2, E}, at::kLong);
  at::Tensor edge_weight = at::empty({E}, at::kFloat);
  int64_t* src = edge_index.data_ptr<int64_t>();
  int64_t* dst = src + E;
  float* ew = edge_weight.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      int64_t e = start[row];
      const size_t l = intra_row(row, [&](int64_t col, double c) {
        src[e] = row;
        dst[e] = col;
        ew[e] = static_cast<float>(c);
        ++e;
      });
      const int64_t count = start[N + row + 1] - start[N + row];
      if (count > 0) {
        const NgLayer& Ly = layers[l];
        const double* q = qp[l] + (row - Ly.offset) * Ly.cin;
        const int64_t prev_off = layers[l - 1].offset;
        int64_t pick = -1;
        double pick_w = 0.0;
        for (int64_t r = 0, e2 = start[N + row]; r < count; ++r, ++e2) {
          pick = ng::topk_next(q, Ly.cin, pick_w, pick);
          pick_w = q[pick];
          src[e2] = row;
          dst[e2] = prev_off + pick;
          ew[e2] = static_cast<float>(pick_w);
        }
      }
    }
  });

  auto [node_layer, layer_offsets] = neuron_graphs_node_index(layers);
  return {edge_index, edge_weight, node_layer, layer_offsets, features};
}

}  // namespace onp_fast
