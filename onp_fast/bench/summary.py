"""`onp-fast demo --graphs`: the neuron graphs of a built-in PreActResNet-18, summarised per layer."""
from __future__ import annotations

import time

import torch

from ..ops import neuron_graphs
from .graphs import preactresnet18_weights


def graph_summary(weights: list[torch.Tensor], eps: float = 0.5, dormant_quantile: float = 0.05,
                  cross_layer_topk: int = 3) -> tuple[list[dict], float]:
    """Builds the graphs of `weights` (conv/linear tensors) in one op call; returns per-layer rows
    (layer, shape, neurons, dormant, edges, cross_edges, mean_degree, ms: that layer's graph built alone) and
    the seconds of the one call over all layers."""
    t0 = time.perf_counter()
    g = neuron_graphs(weights, eps, dormant_quantile, cross_layer_topk)
    seconds = time.perf_counter() - t0
    src_layer = g.node_layer[g.edge_index[0]]
    intra = src_layer == g.node_layer[g.edge_index[1]]
    intra_counts = torch.bincount(src_layer[intra], minlength=len(weights)).tolist()
    cross_counts = torch.bincount(src_layer[~intra], minlength=len(weights)).tolist()
    active = g.node_features[:, 4]
    rows = []
    for l, w in enumerate(weights):
        lo, hi = int(g.layer_offsets[l]), int(g.layer_offsets[l + 1])
        n = hi - lo
        t0 = time.perf_counter()
        neuron_graphs([w], eps, dormant_quantile)  # this layer's graph alone, for its time
        ms = (time.perf_counter() - t0) * 1000
        rows.append({"layer": l, "shape": "x".join(map(str, w.shape)), "neurons": n,
                     "dormant": int((active[lo:hi] == 0).sum()), "edges": intra_counts[l],
                     "cross_edges": cross_counts[l], "mean_degree": intra_counts[l] / n, "ms": ms})
    return rows, seconds


def run(seed: int = 0, eps: float = 0.5, dormant_quantile: float = 0.05, cross_layer_topk: int = 3,
        echo=print) -> list[dict]:
    """Prints the per-layer summary of a seeded PreActResNet-18's neuron graphs; returns the rows."""
    weights = preactresnet18_weights(seed)
    neuron_graphs(weights[:1])  # load the extension outside the timing
    rows, seconds = graph_summary(weights, eps, dormant_quantile, cross_layer_topk)
    echo(f"PreActResNet-18 (10 classes, seed {seed}, random init): {len(weights)} conv/linear layers, "
         f"eps={eps}, dormant_quantile={dormant_quantile}, cross_layer_topk={cross_layer_topk}")
    head = ("layer", "shape", "neurons", "dormant", "edges", "cross_edges", "mean_degree", "ms")
    table = [head] + [tuple(f"{r[k]:.1f}" if isinstance(r[k], float) else str(r[k]) for k in head) for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    for t in table:
        echo("  ".join(c.rjust(w) for c, w in zip(t, widths)))
    echo(f"total: {sum(r['neurons'] for r in rows)} neurons, {sum(r['dormant'] for r in rows)} dormant, "
         f"{sum(r['edges'] for r in rows)} intra-layer edges, {sum(r['cross_edges'] for r in rows)} cross-layer "
         f"edges; one op call for all layers: {seconds * 1000:.1f} ms on {torch.get_num_threads()} CPU thread(s)")
    return rows
