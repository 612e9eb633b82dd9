"""Thin wrapper of torch.ops.onp_fast.neuron_graphs: every layer's neuron graph from its weights, in one call.

All validation happens in C++ (ValueError naming the problem and the layer index); this module only dispatches.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import torch

from .._ext import load


class NeuronGraphs(NamedTuple):
    """One batched graph over the neurons of L layers (N neurons, E edges), on the weights' device.

    edge_index:    [2, E] int64, global node ids (node id = layer_offsets[l] + neuron index). Intra-layer edges
                   first (both directions, ordered by layer, then source, then destination), then cross-layer
                   edges src = neuron j of layer l+1 -> dst = neuron i of layer l (ordered by l, j, rank).
    edge_weight:   [E] float32, the cosine (intra) or ||W_{l+1}[j, i]||_1 (cross).
    node_layer:    [N] int64, each node's layer index (a PyG `batch` vector).
    layer_offsets: [L+1] int64, first node id of each layer; layer_offsets[L] = N.
    node_features: [N, 5] float32: ||q||_1, mean_c q, max_c q, population std_c q, active (1.0) / dormant (0.0).
    """

    edge_index: torch.Tensor
    edge_weight: torch.Tensor
    node_layer: torch.Tensor
    layer_offsets: torch.Tensor
    node_features: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return int(self.node_layer.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def to_pyg(self):
        """A torch_geometric Data with x = node_features, edge_index, edge_attr = edge_weight [E, 1],
        batch = node_layer."""
        from torch_geometric.data import Data

        return Data(x=self.node_features, edge_index=self.edge_index, edge_attr=self.edge_weight.unsqueeze(1),
                    batch=self.node_layer, num_nodes=self.num_nodes)


def neuron_graphs(weights: Sequence[torch.Tensor], eps: float = 0.5, dormant_quantile: float = 0.05,
                  cross_layer_topk: int = 0) -> NeuronGraphs:
    """Builds every layer's neuron graph from its weight in one call (C++ on CPU, CUDA kernels on GPU).

    weights: L tensors, conv [C_out, C_in, kh, kw] or linear [C_out, C_in]; one dtype (float32, float16 or
        bfloat16; accumulated in float64), one device, any strides.
    For layer l: q_i [C_in] = L1 norm of neuron i's kernel slice per input channel; neuron i is dormant when
    ||q_i||_1 is below the dormant_quantile (linear interpolation) of the layer's ||q||_1, or zero; edge (i, j),
    i != j, both active, when cos(q_i, q_j) >= eps (eps in [-1, 1]). cross_layer_topk = k > 0 adds, for
    consecutive weights whose shapes chain (C_in of l+1 == C_out of l), edges from each neuron j of l+1 to
    its k heaviest neurons i of l (weight ||W_{l+1}[j, i]||_1 > 0; ties: smaller i first).
    Returns a NeuronGraphs (see its fields). Deterministic.
    """
    load_op()
    return NeuronGraphs(*torch.ops.onp_fast.neuron_graphs(list(weights), float(eps), float(dormant_quantile),
                                                          int(cross_layer_topk)))


@functools.lru_cache(maxsize=None)
def load_op():
    """Loads the extension (UserError saying how to build it when missing) and registers the op's shape
    function for FakeTensor / torch.compile (E is data-dependent); returns the op."""
    load()

    @torch.library.register_fake("onp_fast::neuron_graphs")
    def _(weights, eps, dormant_quantile, cross_layer_topk):
        n = sum(int(w.shape[0]) for w in weights)
        e = torch.library.get_ctx().new_dynamic_size()
        w0 = weights[0]
        return (w0.new_empty((2, e), dtype=torch.int64), w0.new_empty((e,), dtype=torch.float32),
                w0.new_empty((n,), dtype=torch.int64), w0.new_empty((len(weights) + 1,), dtype=torch.int64),
                w0.new_empty((n, 5), dtype=torch.float32))

    return torch.ops.onp_fast.neuron_graphs
