"""`digits`: scikit-learn's bundled 8x8 hand-written digits (1,797 images, offline).

Fixed stratified split, independent of any seed: 1,437 train / 360 test
(sklearn train_test_split(test_size=360, stratify=y, random_state=0)). Pixels 0..16 are divided by 16,
then bilinearly upsampled (align_corners=False) to 16x16; 1 channel, 10 classes.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .splits import DataSplits, make_splits

TEST_SIZE = 360
SIZE = 16


@functools.lru_cache(maxsize=1)
def _load() -> DataSplits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.from_numpy(data.images).float().div_(16.0).unsqueeze(1)
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    y = torch.from_numpy(data.target).long()
    idx_train, idx_test = train_test_split(
        range(len(y)), test_size=TEST_SIZE, stratify=data.target, random_state=0
    )
    idx_train, idx_test = torch.tensor(idx_train), torch.tensor(idx_test)
    return make_splits("digits", x[idx_train], y[idx_train], x[idx_test], y[idx_test], num_classes=10)


def load_digits_splits() -> DataSplits:
    """The digits DataSplits (cached; callers get the shared tensors, clone before editing in place)."""
    return _load()
