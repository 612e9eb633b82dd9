"""Training shared by the test fixtures."""
import torch
import torch.nn.functional as F
from torch import nn


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int = 32, lr: float = 0.01) -> None:
    """Adam on cross-entropy over (x [N, ...] model input, y [N] int64) in fixed order; leaves `model` in eval
    mode."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for i in range(0, len(x), batch):
            loss = F.cross_entropy(model(x[i:i + batch]), y[i:i + batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def quadrant_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable 4-class task on [n, 1, 8, 8]: class c is a bright 3x3 block in quadrant c, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
    for c in range(4):
        r, col = 4 * (c // 2), 4 * (c % 2)
        x[y == c, :, r:r + 3, col:col + 3] += 1.0
    return x, y


def block_pixels(n: int, seed: int, step: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 1, 8, 8] pixels in [0, 1], 4 classes: class c is a bright 3x3 block at row 3 (c // 2) * step, column
    (c % 2) * step, on faint noise (step 4: the quadrants; step 3: the top-left 6x6)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = 0.3 + torch.randn(n, 1, 8, 8, generator=g) * 0.1
    for c in range(4):
        r, col = step * (c // 2), step * (c % 2)
        x[y == c, :, r:r + 3, col:col + 3] += 0.5
    return x.clamp(0, 1), y
