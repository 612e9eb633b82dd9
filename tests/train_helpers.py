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
