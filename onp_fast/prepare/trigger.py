"""A trigger proxy synthesised from clean data only (Neural Cleanse style), used by the reward term CA_T.

For every class t, a mask M_t [1, H, W] and pattern P_t [C, H, W] are optimised (all classes in one batched
pass) so that x * (1 - M_t) + P_t * M_t is classified as t for clean images of other classes, with an L1
penalty on M_t. A backdoor target needs a far smaller mask than the other classes: the class with the
smallest mask (its MAD anomaly index is reported) gives the proxy. Nothing here reads a real trigger.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..torchutil import frozen


@dataclass
class TriggerProxy:
    """mask [1, H, W] and pattern [C, H, W] in the model's input space, target class, per-class mask L1
    norms [T], anomaly index of the target (how far below the median, in MAD units)."""

    mask: torch.Tensor
    pattern: torch.Tensor
    target: int
    norms: torch.Tensor
    anomaly_index: float

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W] (normalised) -> stamped [N, C, H, W]."""
        return x * (1 - self.mask) + self.pattern * self.mask


def synthesize_trigger(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, *, steps: int = 100,
                       batch: int = 24, lam: float = 10.0, lr: float = 0.1, seed: int = 0) -> TriggerProxy:
    """x [N, C, H, W] normalised clean images, y [N] int64 -> the proxy of the class with the smallest mask.
    `steps` Adam steps (lr) on `batch` images per class per step; lam weighs the mean mask value against the
    cross-entropy (the default's measurements: docs/design.md)."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = x.shape
    lo = x.amin(dim=(0, 2, 3)).view(1, c, 1, 1)
    hi = x.amax(dim=(0, 2, 3)).view(1, c, 1, 1)
    mlog = torch.full((num_classes, 1, h, w), -3.0).requires_grad_(True)
    plog = (torch.randn(num_classes, c, h, w, generator=g) * 0.1).requires_grad_(True)
    opt = torch.optim.Adam([mlog, plog], lr=lr)
    targets = torch.arange(num_classes)
    with frozen(model):
        for _ in range(steps):
            idx = torch.randint(0, n, (batch,), generator=g)
            xb, yb = x[idx], y[idx]
            m, p = torch.sigmoid(mlog), lo + (hi - lo) * torch.sigmoid(plog)
            stamped = xb.unsqueeze(0) * (1 - m.unsqueeze(1)) + (p * m).unsqueeze(1)  # [T, b, C, H, W]
            logits = model(stamped.reshape(-1, c, h, w))
            tgt = targets.repeat_interleave(batch)
            other = (yb.unsqueeze(0) != targets.unsqueeze(1)).reshape(-1).float()
            ce = (F.cross_entropy(logits, tgt, reduction="none") * other).sum() / other.sum().clamp(min=1)
            loss = ce * num_classes + lam * m.mean(dim=(1, 2, 3)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        m, p = torch.sigmoid(mlog), lo + (hi - lo) * torch.sigmoid(plog)
        norms = m.sum(dim=(1, 2, 3))
        t = int(norms.argmin())
        med = norms.median()
        mad = (norms - med).abs().median().clamp(min=1e-8)
        anomaly = float((med - norms[t]) / (1.4826 * mad))
    return TriggerProxy(mask=m[t].clone(), pattern=p[t].clone(), target=t, norms=norms, anomaly_index=anomaly)
