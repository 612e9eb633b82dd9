"""Pure-PyTorch references of the ops, beside them for the tests (equality) and the benchmarks (the baseline):
neuron_graphs (csrc/cpu/neuron_graphs_cpu.cpp), bn_mask_relu and reward_epilogue (csrc/cpu/masked_forward_cpu.cpp).

Vectorised: no Python loop over neurons; layers of equal shape are batched (one bmm for their Gram matrices).
Takes the same decisions as csrc/common/neuron_graphs.h on the same doubles, so edge sets and order match the op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_COS_SLACK = 1e-9  # csrc/common/neuron_graphs.h: kCosSlack


def connection_strength(w: torch.Tensor) -> torch.Tensor:
    """q [C_out, C_in] float64: q[i, c] = sum over kernel positions of |w[i, c]|.

    w: [C_out, C_in] or [C_out, C_in, kh, kw], float32/float16/bfloat16, any strides.
    """
    if w.dim() == 4:
        return w.abs().sum(dim=(2, 3), dtype=torch.float64)
    return w.abs().to(torch.float64)


def _lerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    # torch.lerp's formula, as in csrc/common/neuron_graphs.h
    return a + w * (b - a) if w < 0.5 else b - (b - a) * (1.0 - w)


def _threshold(l1: torch.Tensor, quantile: float) -> torch.Tensor:
    """Linear-interpolation quantile of l1 [G, n] float64 along dim 1 -> [G] float64."""
    n = l1.shape[1]
    pos = quantile * (n - 1)
    lo = min(int(pos // 1), n - 1)
    hi = min(lo + (1 if pos > lo else 0), n - 1)
    s = torch.sort(l1, dim=1).values
    return _lerp(s[:, lo], s[:, hi], pos - lo)


def _topk_edges(q: torch.Tensor, k: int):
    """Top-k of each row of q [n, c] float64 by (value desc, index asc), positive values only.
    Returns (row [M], col [M] int64, weight [M] float32) ordered by row, then rank."""
    n, c = q.shape
    k = min(k, c)
    kth = torch.topk(q, k, dim=1).values[:, k - 1:]  # [n, 1] the k-th largest value
    above = q > kth
    ties = q == kth  # fill the remaining places with the smallest-index ties
    keep = above | (ties & (torch.cumsum(ties, dim=1) <= k - above.sum(dim=1, keepdim=True)))
    keep &= q > 0
    row, col = keep.nonzero(as_tuple=True)  # ascending index within each row
    per_row = keep.sum(dim=1)
    # order each row's picks by value descending (stable: ties keep ascending index)
    width = int(per_row.max()) if n else 0
    slot = torch.arange(row.shape[0], device=q.device) - torch.repeat_interleave(torch.cumsum(per_row, 0) - per_row,
                                                                                   per_row)
    vals = torch.full((n, width), -1.0, dtype=q.dtype, device=q.device)
    cols = torch.zeros((n, width), dtype=torch.int64, device=q.device)
    vals[row, slot] = q[row, col]
    cols[row, slot] = col
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    vals, cols = vals.gather(1, order), cols.gather(1, order)
    valid = vals > 0
    rows = torch.arange(n, device=q.device).unsqueeze(1).expand(n, width)
    return rows[valid], cols[valid], vals[valid].float()


def neuron_graphs_reference(weights, eps: float = 0.5, dormant_quantile: float = 0.05, cross_layer_topk: int = 0):
    """Same arguments and outputs as torch.ops.onp_fast.neuron_graphs (see onp_fast.ops.neuron_graphs).

    Returns (edge_index [2, E] int64, edge_weight [E] float32, node_layer [N] int64,
    layer_offsets [L+1] int64, node_features [N, 5] float32), all on the weights' device.
    """
    weights = list(weights)
    device = weights[0].device
    L = len(weights)
    couts = [int(w.shape[0]) for w in weights]
    offsets = torch.zeros(L + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(couts, dtype=torch.int64), 0)
    off = offsets.tolist()
    qs = [connection_strength(w) for w in weights]

    groups: dict[tuple[int, int], list[int]] = {}
    for l, q in enumerate(qs):
        groups.setdefault(tuple(q.shape), []).append(l)

    feats = [None] * L
    intra = [None] * L  # per layer: (i, j, weight, node offset)
    for (n, cin), members in groups.items():
        Q = torch.stack([qs[l] for l in members])  # [G, n, cin]
        gram = torch.bmm(Q, Q.transpose(1, 2))  # [G, n, n]
        gram = gram.triu() + gram.triu(1).transpose(1, 2)  # the op reads G[min(i,j), max(i,j)]: exactly symmetric
        l1 = Q.sum(dim=2)
        mean = l1 / cin
        std = (Q - mean.unsqueeze(2)).square().sum(dim=2).div(cin).sqrt()
        active = ~((l1 < _threshold(l1, dormant_quantile).unsqueeze(1)) | (l1 == 0))
        norm = gram.diagonal(dim1=1, dim2=2).sqrt()
        cos = (gram / (norm.unsqueeze(2) * norm.unsqueeze(1))).clamp(-1.0, 1.0)
        mask = (cos >= eps - _COS_SLACK) & active.unsqueeze(2) & active.unsqueeze(1)
        mask.diagonal(dim1=1, dim2=2).fill_(False)
        g, i, j = mask.nonzero(as_tuple=True)
        weight = cos[mask].float()
        counts = mask.sum(dim=(1, 2)).tolist()
        f = torch.stack([l1, mean, Q.amax(dim=2), std, active.double()], dim=2).float()
        for k, (l, ii, jj, w) in enumerate(zip(members, i.split(counts), j.split(counts), weight.split(counts))):
            intra[l] = (ii, jj, w, off[l])
            feats[l] = f[k]

    cross = []
    if cross_layer_topk > 0:
        for l in range(1, L):
            if qs[l].shape[1] == couts[l - 1]:
                j, i, w = _topk_edges(qs[l], cross_layer_topk)
                cross.append((j, i, w, off[l], off[l - 1]))

    # Assemble in the op's order (intra edges by layer, then cross edges) straight into the outputs.
    parts = [(ii, jj, w, o, o) for ii, jj, w, o in intra] + cross
    E = sum(int(p[2].shape[0]) for p in parts)
    edge_index = torch.empty(2, E, dtype=torch.int64, device=device)
    edge_weight = torch.empty(E, dtype=torch.float32, device=device)
    at = 0
    for src, dst, w, src_off, dst_off in parts:
        m = int(w.shape[0])
        torch.add(src, src_off, out=edge_index[0, at:at + m])
        torch.add(dst, dst_off, out=edge_index[1, at:at + m])
        edge_weight[at:at + m] = w
        at += m
    node_layer = torch.repeat_interleave(torch.arange(L), torch.tensor(couts)).to(device)
    return edge_index, edge_weight, node_layer, offsets.to(device), torch.cat(feats)


def bn_mask_relu_reference(x, scale, shift, index=None, relu=True):
    """Same contract as ops.masked_forward.bn_mask_relu: x [Kx, B, C, *S] float32/bfloat16/float16,
    scale/shift [K, C] float32, index [K, C'] or None -> [K, B, C', *S] of x's dtype.

    Computed in float32 and rounded once to x's dtype, as the op does.
    """
    K, C = scale.shape
    extra = [1] * (x.dim() - 3)
    y = x.float() * scale.float().view(K, 1, C, *extra) + shift.float().view(K, 1, C, *extra)
    if relu:
        y = torch.relu(y)
    y = y.to(x.dtype)
    if index is None:
        return y
    y = torch.cat([y, torch.zeros_like(y[:, :, :1])], dim=2)  # channel C: the zero channel for index -1
    idx = torch.where(index < 0, torch.full_like(index, C), index)
    gather = idx.view(K, 1, -1, *extra).expand(K, y.shape[1], -1, *y.shape[3:])
    return torch.gather(y, 2, gather)


def reward_epilogue_reference(logits, labels):
    """logits [K, B, C], labels [B] -> (correct [K] int64, ce_sum [K] float64, counts [K, C] int64,
    prob_sum [K] float64: the summed softmax probability of the label)."""
    K, B, C = logits.shape
    pred = logits.argmax(-1)
    correct = (pred == labels).sum(1)
    ce = F.cross_entropy(logits.double().reshape(K * B, C), labels.repeat(K), reduction="none").view(K, B).sum(1)
    counts = torch.zeros(K, C, dtype=torch.int64, device=pred.device).scatter_add_(1, pred, torch.ones_like(pred))
    prob = logits.double().softmax(-1).gather(2, labels.view(1, B, 1).expand(K, B, 1)).view(K, B).sum(1)
    return correct, ce, counts, prob
