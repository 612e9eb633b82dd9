"""`shapes`: seeded procedural 10-class RGB images (default 32x32, 10,000 train / 2,000 test).

Each image is a coloured shape on a random texture. The class is the shape only:
0 disc, 1 square, 2 triangle, 3 plus, 4 ring, 5 diamond, 6 X, 7 frame (hollow square), 8 half-disc, 9 two dots.
Position, size, shape colour and background (a random colour plus smooth and fine noise) are drawn
independently of the class; the shape's colour is kept at least 0.35 away from the background's mean in
brightness so that it is always visible. Generated vectorised in torch from a seeded generator; train and
test use different streams of the same seed. Specs: `shapes`, `shapes:NTRAIN`, `shapes:NTRAIN:NTEST`.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .splits import DataSplits, make_splits

CLASSES = ["disc", "square", "triangle", "plus", "ring", "diamond", "x", "frame", "half_disc", "two_dots"]
DEFAULT_TRAIN, DEFAULT_TEST = 10_000, 2_000


def _shape_mask(k: int, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Mask of shape class k. dx, dy: [N, H, W] offsets from the centre in pixels; r: [N, 1, 1] radius in
    pixels -> [N, H, W] bool."""
    ax, ay = dx.abs(), dy.abs()
    bar = 0.3 * r
    if k in (0, 4, 8):
        d = torch.sqrt(dx * dx + dy * dy)
        if k == 0:
            return d < r                                                         # disc
        if k == 4:
            return (d < r) & (d > 0.55 * r)                                      # ring
        return (d < r) & (dy > -0.1 * r)                                         # half-disc (lower half)
    if k == 1:
        return torch.maximum(ax, ay) < 0.82 * r                                  # square
    if k == 2:
        return (dy < 0.65 * r) & (ax < (dy + r) * 0.6) & (dy > -r)               # triangle (apex up)
    if k == 3:
        return ((ax < bar) & (ay < r)) | ((ay < bar) & (ax < r))                 # plus
    if k == 5:
        return ax + ay < 1.1 * r                                                 # diamond
    if k == 6:
        d1, d2 = (dx - dy).abs() / math.sqrt(2), (dx + dy).abs() / math.sqrt(2)
        return ((d1 < bar) & (d2 < r)) | ((d2 < bar) & (d1 < r))                 # X
    if k == 7:
        cheb = torch.maximum(ax, ay)
        return (cheb < 0.85 * r) & (cheb > 0.5 * r)                              # frame
    return torch.sqrt((ax - 0.55 * r) ** 2 + ay * ay) < 0.42 * r                 # two dots


def _masks(labels: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Shape masks. labels: [N] int64; dx, dy: [N, H, W] pixel offsets from the centre; r: [N, 1, 1]
    radius in pixels -> [N, H, W] bool."""
    out = torch.empty_like(dx, dtype=torch.bool)
    for k in range(len(CLASSES)):
        idx = (labels == k).nonzero().squeeze(1)
        if idx.numel():
            out[idx] = _shape_mask(k, dx[idx], dy[idx], r[idx])
    return out


def generate(n: int, seed: int, size: int = 32, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """n images: ([n, 3, size, size] float32 in [0, 1], [n] int64 balanced labels, shuffled), seeded."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASSES)
    labels = labels[torch.randperm(n, generator=g)]
    xs = []
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    for start in range(0, n, chunk):
        lab = labels[start:start + chunk]
        m = lab.shape[0]
        r = (0.19 + 0.15 * torch.rand(m, generator=g)) * size                       # radius 6..11 px at 32
        margin = r + 1.0
        cx = margin + torch.rand(m, generator=g) * (size - 2 * margin)
        cy = margin + torch.rand(m, generator=g) * (size - 2 * margin)
        dx = coords.view(1, 1, -1) - cx.view(-1, 1, 1)
        dy = coords.view(1, -1, 1) - cy.view(-1, 1, 1)
        dx, dy = dx.expand(m, size, size), dy.expand(m, size, size)
        mask = _masks(lab, dx, dy, r.view(-1, 1, 1)).unsqueeze(1).float()           # [m, 1, H, W]
        # background: random colour + smooth noise (4x4 upsampled) + fine noise
        bg = torch.rand(m, 3, 1, 1, generator=g) * 0.8 + 0.1
        smooth = F.interpolate(torch.rand(m, 3, 4, 4, generator=g) - 0.5, size=(size, size), mode="bilinear",
                               align_corners=False)
        background = bg + 0.25 * smooth + 0.06 * (torch.rand(m, 3, size, size, generator=g) - 0.5)
        # foreground: random hue, brightness pushed away from the background's mean brightness
        fg = torch.rand(m, 3, 1, 1, generator=g)
        bg_lum, fg_lum = bg.mean(1, keepdim=True), fg.mean(1, keepdim=True)
        target = torch.where(bg_lum > 0.5, bg_lum - 0.35 - 0.3 * torch.rand(m, 1, 1, 1, generator=g),
                             bg_lum + 0.35 + 0.3 * torch.rand(m, 1, 1, 1, generator=g))
        fg = (fg - fg_lum + target).clamp(0.0, 1.0)
        fg = fg + 0.04 * (torch.rand(m, 3, size, size, generator=g) - 0.5)
        xs.append((mask * fg + (1 - mask) * background).clamp_(0.0, 1.0))
    return torch.cat(xs), labels


@functools.lru_cache(maxsize=4)
def _load(n_train: int, n_test: int, seed: int) -> DataSplits:
    train_x, train_y = generate(n_train, seed * 2 + 0)
    test_x, test_y = generate(n_test, seed * 2 + 1)
    return make_splits(f"shapes:{n_train}:{n_test}", train_x, train_y, test_x, test_y, num_classes=len(CLASSES))


def load_shapes(n_train: int = DEFAULT_TRAIN, n_test: int = DEFAULT_TEST, seed: int = 0) -> DataSplits:
    """The shapes DataSplits (cached in memory per (n_train, n_test, seed))."""
    return _load(int(n_train), int(n_test), int(seed))
