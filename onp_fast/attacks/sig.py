"""SIG (clean-label): a horizontal sinusoid added to every row, x' = clip(x + delta sin(2 pi j f / W)).

j is the column index 0..W-1, delta = 40/255, f = 6 cycles across the image width (so the pattern scales
with the image). Training poisons target-class images only and keeps their labels.
"""
from __future__ import annotations

import math

import torch

from ..errors import UserError
from .base import Attack, register


@register
class SIG(Attack):
    name = "sig"
    clean_label = True

    def __init__(self, image_shape, seed: int = 0, delta: float = 40 / 255, frequency: float = 6.0):
        super().__init__(image_shape, seed)
        if not 0.0 < float(delta) <= 1.0:
            raise UserError(f"sig: delta must be in (0, 1], got {delta}")
        if float(frequency) <= 0:
            raise UserError(f"sig: frequency must be > 0, got {frequency}")
        self.delta = float(delta)
        self.frequency = float(frequency)
        w = self.image_shape[2]
        j = torch.arange(w, dtype=torch.float64)
        self.signal = (self.delta * torch.sin(2 * math.pi * j * self.frequency / w)).float()  # [W]

    def params(self) -> dict:
        return {"delta": self.delta, "frequency": self.frequency}

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, C, H, W] float pixels in [0, 1] -> clip(images + signal[j], 0, 1), same along rows."""
        self._check(images)
        return (images + self.signal.to(images.device, images.dtype)).clamp_(0.0, 1.0)
