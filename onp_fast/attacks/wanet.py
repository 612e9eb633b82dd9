"""WaNet: a smooth warp of the image, with "noise mode" (BackdoorBench parameters k=4, s=0.5, cross_ratio=2).

Grid (seeded): a random control grid [1, 2, k, k] uniform in [-1, 1], divided by its mean absolute value,
upsampled bicubically (align_corners) to [H, W]; warp = (identity + s * grid / (H, W)) * grid_rescale,
clamped to [-1, 1], applied with grid_sample (bilinear, align_corners). Coordinates are normalised, so the
warp is about s/2 * |grid| pixels whatever the image size.

Poisoning happens per training batch, as in BackdoorBench: in each batch of B images the first
int(B * rate) are warped and relabelled to the target, the next int(that * cross_ratio) are warped with
grid + uniform noise in [-1/H, 1/H] (fresh every batch) and keep their labels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import Attack, PoisonedSet, register


@register
class WaNet(Attack):
    name = "wanet"

    def __init__(self, image_shape, seed: int = 0, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0,
                 cross_ratio: float = 2.0):
        super().__init__(image_shape, seed)
        _, h, w = self.image_shape
        if int(k) < 2:
            raise UserError(f"wanet: k must be >= 2, got {k}")
        if float(cross_ratio) < 0:
            raise UserError(f"wanet: cross_ratio must be >= 0, got {cross_ratio}")
        self.k, self.s, self.grid_rescale, self.cross_ratio = int(k), float(s), float(grid_rescale), float(cross_ratio)
        g = torch.Generator().manual_seed(self.seed)
        ins = torch.rand(1, 2, self.k, self.k, generator=g) * 2 - 1
        ins = ins / ins.abs().mean()
        noise = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ys = torch.linspace(-1, 1, h)
        xs = torch.linspace(-1, 1, w)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        identity = torch.stack((xx, yy), dim=2)[None]  # [1, H, W, 2], (x, y) as grid_sample wants
        self.scale = torch.tensor([1.0 / w, 1.0 / h])  # per-axis 1/side, BackdoorBench's 1/H on squares
        self.grid = ((identity + self.s * noise * self.scale) * self.grid_rescale).clamp(-1, 1)  # [1, H, W, 2]

    def params(self) -> dict:
        return {"k": self.k, "s": self.s, "grid_rescale": self.grid_rescale, "cross_ratio": self.cross_ratio}

    def noise_grid(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """[n, H, W, 2] float32: the warp plus uniform noise in [-1/side, 1/side], clamped to [-1, 1]."""
        _, h, w = self.image_shape
        noise = torch.rand(n, h, w, 2, generator=generator) * 2 - 1
        return (self.grid + noise * self.scale).clamp(-1, 1)

    def _warp(self, images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        grid = grid.to(images.device, images.dtype).expand(images.shape[0], -1, -1, -1)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True).clamp_(0, 1)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, C, H, W] float pixels in [0, 1] -> warped copy (the backdoor trigger)."""
        self._check(images)
        return self._warp(images, self.grid)

    def apply_noise(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """images: [B, C, H, W] float pixels -> warped with grid + fresh noise (noise mode, labels kept)."""
        self._check(images)
        return self._warp(images, self.noise_grid(images.shape[0], generator))

    def poison_training_set(self, x, y, rate, target, generator) -> PoisonedSet:
        """Clean x [N, C, H, W], y [N] plus the per-batch poisoning transform (see the module docstring)."""
        rate, target = float(rate), int(target)

        def transform(xb: torch.Tensor, yb: torch.Tensor, gen: torch.Generator):
            n_bd = int(xb.shape[0] * rate)
            n_cross = min(int(n_bd * self.cross_ratio), xb.shape[0] - n_bd)
            if n_bd == 0 and n_cross == 0:
                return xb, yb
            xb, yb = xb.clone(), yb.clone()
            if n_bd:
                xb[:n_bd] = self.apply(xb[:n_bd])
                yb[:n_bd] = target
            if n_cross:
                xb[n_bd:n_bd + n_cross] = self.apply_noise(xb[n_bd:n_bd + n_cross], gen)
            return xb, yb

        return PoisonedSet(x=x, y=y, poisoned_index=torch.empty(0, dtype=torch.int64), transform=transform)
