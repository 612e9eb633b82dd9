"""Small helpers shared by the model families."""
from __future__ import annotations


def scaled(channels: int, width: float, divisor: int = 1) -> int:
    """Channel count `channels * width`, rounded to a multiple of `divisor`, at least `divisor`."""
    value = max(divisor, int(round(channels * width / divisor)) * divisor)
    return value


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's channel rounding for MobileNet: nearest multiple of `divisor`, never below 90% of value."""
    min_value = min_value or divisor
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def is_small_input(input_size: int) -> bool:
    """CIFAR-style (small) inputs get stride-1 stems; ImageNet-style inputs the usual downsampling stem."""
    return input_size <= 64
