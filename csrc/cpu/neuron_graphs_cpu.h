// neuron_graphs: argument checks and layout shared by the back ends, and the CPU implementation.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "common/neuron_graphs.h"

namespace onp_fast {

// (edge_index [2, E] int64, edge_weight [E] float32, node_layer [N] int64, layer_offsets [L+1] int64,
//  node_features [N, 5] float32)
using NeuronGraphsOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

using ng::NgLayer;

// Checks everything that does not need the weights' values (TORCH_CHECK_VALUE -> ValueError naming the
// problem and the layer index) and returns the layers' shapes, strides and node offsets.
// NaN/inf values are found by the back ends while they read the weights (check_finite_l1).
std::vector<NgLayer> neuron_graphs_check_args(const std::vector<at::Tensor>& weights, double eps,
                                              double dormant_quantile, int64_t cross_layer_topk);

// Raises ValueError naming the first layer whose row L1 norms l1 [N] (double, CPU) are not finite.
void neuron_graphs_check_finite(const double* l1, const std::vector<NgLayer>& layers);

// node_layer [N] and layer_offsets [L+1] (int64, CPU).
std::pair<at::Tensor, at::Tensor> neuron_graphs_node_index(const std::vector<NgLayer>& layers);

// Whether layer l (l >= 1) gets cross-layer edges to layer l - 1 (its C_in equals C_out of l - 1).
inline bool ng_chains(const std::vector<NgLayer>& layers, size_t l, int64_t topk) {
  return topk > 0 && l >= 1 && layers[l].cin == layers[l - 1].cout;
}

NeuronGraphsOut neuron_graphs_cpu(const std::vector<at::Tensor>& weights, double eps, double dormant_quantile,
                                  int64_t cross_layer_topk);

}  // namespace onp_fast
