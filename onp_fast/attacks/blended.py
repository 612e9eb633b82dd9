"""Blended: x' = (1 - alpha) x + alpha p, p a fixed image-sized pattern (alpha = 0.2).

BackdoorBench blends a photo; here p is uniform noise in [0, 1], shape (C, H, W), drawn from `seed`.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from .base import Attack, register


@register
class Blended(Attack):
    name = "blended"

    def __init__(self, image_shape, seed: int = 0, alpha: float = 0.2):
        super().__init__(image_shape, seed)
        if not 0.0 < float(alpha) <= 1.0:
            raise UserError(f"blended: alpha must be in (0, 1], got {alpha}")
        self.alpha = float(alpha)
        g = torch.Generator().manual_seed(self.seed)
        self.pattern = torch.rand(self.image_shape, generator=g)  # [C, H, W] float32 in [0, 1)

    def params(self) -> dict:
        return {"alpha": self.alpha}

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, C, H, W] float pixels in [0, 1] -> (1 - alpha) images + alpha pattern."""
        self._check(images)
        pattern = self.pattern.to(images.device, images.dtype)
        return images * (1.0 - self.alpha) + pattern * self.alpha
