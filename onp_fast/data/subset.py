"""Defense subsets: small stratified samples of the train split."""
from __future__ import annotations

import torch

from ..errors import UserError
from .splits import DataSplits


def stratified_indices(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n indices into y ([N] int64), seeded, with each class's count proportional to its frequency
    (largest remainders; every present class gets at least one when n allows) -> [n] int64, sorted."""
    if n < 1:
        raise UserError(f"subset size must be positive, got {n}")
    if n > y.numel():
        raise UserError(f"subset size {n} is larger than the {y.numel()} available images")
    g = torch.Generator().manual_seed(int(seed))
    classes, counts = torch.unique(y, return_counts=True)
    exact = counts.double() * n / y.numel()
    take = exact.floor().long()
    if n >= len(classes):
        take = take.clamp_min(1).minimum(counts)
    while take.sum() > n:  # clamp_min(1) may overshoot: take back from the largest
        take[torch.argmax(take - exact)] -= 1
    remainder = exact - take
    while take.sum() < n:
        room = (take < counts).double()
        i = int(torch.argmax(remainder * room + room * 1e-9))
        take[i] += 1
        remainder[i] = -1.0
    picks = []
    for c, k in zip(classes.tolist(), take.tolist()):
        pool = (y == c).nonzero().squeeze(1)
        picks.append(pool[torch.randperm(pool.numel(), generator=g)[:k]])
    return torch.cat(picks).sort().values


def defense_subset(splits: DataSplits, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n clean images from the *train* split (so disjoint from the test split), stratified and seeded.

    Returns (x [n, C, H, W] float32 in [0, 1], y [n] int64), copies.
    """
    idx = stratified_indices(splits.train_y, n, seed)
    return splits.train_x[idx].clone(), splits.train_y[idx].clone()
