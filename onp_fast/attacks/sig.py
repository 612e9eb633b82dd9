"""SIG (clean-label): a horizontal sinusoid added to every row, x' = clip(x + delta sin(2 pi j f / W)).

j is the column index 0..W-1, delta = 40/255, f = 6 cycles across the image width (so the pattern scales
with the image). Training poisons target-class images only and keeps their labels.

Barni et al. (ICIP 2019) train with one strength and may attack with a stronger one: `train_delta` is the
strength stamped on the poisoned training images (default: `delta`, BackdoorBench's choice), `delta` the
strength `apply` stamps at test time.
"""
from __future__ import annotations

import math

import torch

from ..errors import UserError
from .base import Attack, PoisonedSet, register


@register
class SIG(Attack):
    name = "sig"
    clean_label = True

    def __init__(self, image_shape, seed: int = 0, delta: float = 40 / 255, frequency: float = 6.0,
                 train_delta: float | None = None):
        super().__init__(image_shape, seed)
        train_delta = delta if train_delta is None else train_delta
        for key, value in (("delta", delta), ("train_delta", train_delta)):
            if not 0.0 < float(value) <= 1.0:
                raise UserError(f"sig: {key} must be in (0, 1], got {value}")
        if float(frequency) <= 0:
            raise UserError(f"sig: frequency must be > 0, got {frequency}")
        self.delta, self.train_delta = float(delta), float(train_delta)
        self.frequency = float(frequency)
        self.signal = self._signal(self.delta)  # [W]

    def _signal(self, delta: float) -> torch.Tensor:
        """[W] float32: delta * sin(2 pi j f / W)."""
        w = self.image_shape[2]
        j = torch.arange(w, dtype=torch.float64)
        return (delta * torch.sin(2 * math.pi * j * self.frequency / w)).float()

    def params(self) -> dict:
        return {"delta": self.delta, "frequency": self.frequency, "train_delta": self.train_delta}

    def apply(self, images: torch.Tensor, signal: torch.Tensor | None = None) -> torch.Tensor:
        """images: [B, C, H, W] float pixels in [0, 1] -> clip(images + signal[j], 0, 1), same along rows."""
        self._check(images)
        signal = self.signal if signal is None else signal
        return (images + signal.to(images.device, images.dtype)).clamp_(0.0, 1.0)

    def poison_training_set(self, x: torch.Tensor, y: torch.Tensor, rate: float, target: int,
                            generator: torch.Generator) -> PoisonedSet:
        """As Attack's, with the training strength `train_delta` on the target-class rows; labels kept."""
        index = self.poison_index(y, rate, target, generator)
        x = x.clone()
        x[index] = self.apply(x[index], self._signal(self.train_delta))
        return PoisonedSet(x=x, y=y.clone(), poisoned_index=index)
