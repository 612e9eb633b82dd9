"""Defense subsets: small stratified samples of the train split."""
from __future__ import annotations

import torch

from ..errors import UserError
from .splits import DataSplits


def shuffled_by_class(y: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """y [N] int64 -> for each class present (ascending), its indices into y in a seeded random order; the one
    generator is drawn from class by class. Every stratified sample takes a prefix of each."""
    g = torch.Generator().manual_seed(int(seed))
    return [idx[torch.randperm(idx.numel(), generator=g)]
            for idx in (torch.nonzero(y == c).flatten() for c in torch.unique(y).tolist())]


def stratified_split(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """y [N] -> (idx_a, idx_b) int64 sorted: round(fraction x count) of every class with 2+ images to b (at least
    one), the rest to a. The classes with one image (many classes, few images: e.g. 40 images of 1,000 classes)
    are split as one pool, shuffled by a generator of its own (seed + 1), round(fraction x their count) to b,
    and at least one when b would otherwise be empty, so both parts hold images whenever N >= 2."""
    a, b, single = [], [], []
    for idx in shuffled_by_class(y, seed):
        if len(idx) == 1:
            single.append(idx)
            continue
        n_b = max(1, int(round(len(idx) * fraction)))
        b.append(idx[:n_b])
        a.append(idx[n_b:])
    if single:
        pool = torch.cat(single)
        pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(int(seed) + 1))]
        n_b = int(round(len(pool) * fraction))
        if not b and len(pool) >= 2:
            n_b = max(1, n_b)
        b.append(pool[:n_b])
        a.append(pool[n_b:])
    return torch.cat(a).sort().values, torch.cat(b).sort().values


def stratified_indices(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n indices into y ([N] int64), seeded, with each class's count proportional to its frequency
    (largest remainders; every present class gets at least one when n allows) -> [n] int64, sorted."""
    if n < 1:
        raise UserError(f"subset size must be positive, got {n}")
    if n > y.numel():
        raise UserError(f"subset size {n} is larger than the {y.numel()} available images")
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
    return torch.cat([pool[:k] for pool, k in zip(shuffled_by_class(y, seed), take.tolist())]).sort().values


def defense_subset(splits: DataSplits, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n clean images from the *train* split (so disjoint from the test split), stratified and seeded.

    Returns (x [n, C, H, W] float32 in [0, 1], y [n] int64), copies.
    """
    idx = stratified_indices(splits.train_y, n, seed)
    return splits.train_x[idx].clone(), splits.train_y[idx].clone()
