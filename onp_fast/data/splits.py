"""DataSplits: one data set as in-memory tensors, and its validation."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError


@dataclass
class DataSplits:
    """A data set. Pixels are float32 in [0, 1]; `mean`/`std` are per channel, from the train split.

    train_x: [N, C, H, W] float32; train_y: [N] int64; test_x: [M, C, H, W] float32; test_y: [M] int64;
    mean, std: [C] float32.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: torch.Tensor
    std: torch.Tensor

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train_x.shape[1:])


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of x: [N, C, H, W] float32 -> ([C], [C]); std floored at 1e-6."""
    xt = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    return xt.mean(1).float(), xt.std(1).clamp_min(1e-6).float()


def make_splits(name: str, train_x, train_y, test_x, test_y, num_classes: int | None = None) -> DataSplits:
    """Validates the arrays (shapes, label range, emptiness) and builds DataSplits with train-split stats.

    train_x/test_x: [N, C, H, W] float in [0, 1]; train_y/test_y: [N] integer labels.
    """
    train_x = torch.as_tensor(train_x, dtype=torch.float32).contiguous()
    test_x = torch.as_tensor(test_x, dtype=torch.float32).contiguous()
    train_y = torch.as_tensor(train_y).reshape(-1)
    test_y = torch.as_tensor(test_y).reshape(-1)
    for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if x.shape[0] == 0:
            raise UserError(f"{name}: the {split} split is empty")
        if x.dim() != 4:
            raise UserError(f"{name}: {split} images must be [N, C, H, W], got shape {list(x.shape)}")
        if y.shape[0] != x.shape[0]:
            raise UserError(f"{name}: {split} has {x.shape[0]} images but {y.shape[0]} labels")
        if y.is_floating_point() and not torch.equal(y, y.round()):
            raise UserError(f"{name}: {split} labels are not integers")
        if not torch.isfinite(x).all():
            raise UserError(f"{name}: {split} images contain NaN or inf")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise UserError(f"{name}: train images are {list(train_x.shape[1:])} but test images {list(test_x.shape[1:])}")
    train_y, test_y = train_y.long(), test_y.long()
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    for split, y in (("train", train_y), ("test", test_y)):
        bad = (y < 0) | (y >= num_classes)
        if bad.any():
            raise UserError(f"{name}: {split} label {int(y[bad][0])} is out of range 0..{num_classes - 1}")
    mean, std = channel_stats(train_x)
    return DataSplits(name, train_x, train_y, test_x, test_y, int(num_classes), mean, std)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """[0, 1] pixels to model input: (x - mean) / std per channel. x: [N, C, H, W]; mean, std: [C]."""
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std
