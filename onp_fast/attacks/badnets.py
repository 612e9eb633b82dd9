"""BadNets: a white square pasted over the bottom-right corner.

BackdoorBench uses a 3x3 square at 32x32; here the side scales with the image:
rows = max(1, round(3 * H / 32)), cols = max(1, round(3 * W / 32)) (round half up), unless `size` is given.
So 32x32 -> 3x3, 16x16 -> 2x2, 8x8 -> 1x1, 64x64 -> 6x6, 224x224 -> 21x21.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from .base import Attack, register


def scaled(length: int, base: float) -> int:
    """A BackdoorBench length `base` (given at 32 pixels) scaled to an image side of `length`, >= 1."""
    return max(1, int(base * length / 32 + 0.5))


@register
class BadNets(Attack):
    name = "badnets"

    def __init__(self, image_shape, seed: int = 0, size: int | None = None, value: float = 1.0):
        super().__init__(image_shape, seed)
        _, h, w = self.image_shape
        self.size = None if size is None else int(size)
        self.rows = scaled(h, 3) if size is None else int(size)
        self.cols = scaled(w, 3) if size is None else int(size)
        if not (1 <= self.rows <= h and 1 <= self.cols <= w):
            raise UserError(f"badnets: trigger size {size} does not fit a {h}x{w} image")
        if not 0.0 <= float(value) <= 1.0:
            raise UserError(f"badnets: trigger value must be in [0, 1], got {value}")
        self.value = float(value)

    def params(self) -> dict:
        return {"size": self.size, "value": self.value}

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, C, H, W] float pixels in [0, 1] -> copy with the bottom-right rows x cols set to value."""
        self._check(images)
        out = images.clone()
        out[:, :, -self.rows:, -self.cols:] = self.value
        return out
