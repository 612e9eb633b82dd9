"""Bench cases of the reward the repair's policy phase computes: one RL iteration's K = 16 masks (each group
pruned with probability 0.02, the default policy's early samples) scored by MaskScorer on 128 clean images
and the ~115 of them stamped with a trigger proxy (CA_B and CA_T, the default reward). Impls: `hooks` (one
hooked forward per mask, the reference: the baseline), `engine` (RewardEngine over the groups' mask
points, batched) and `engine_bf16` (the engine under bfloat16 autocast, `repair --precision bfloat16`).
Models: the digits model's shape (PreActResNet-18 width 0.5, 1x16x16) and, without --quick, the shapes
model's (width 0.5, 3x32x32), random weights with non-trivial BN statistics. Every entry's `note` holds the
backend's masks/s and images/s (from its fastest call).
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from ..groups import find_groups
from ..models import build
from ..reward import MaskScorer, RewardWeights
from . import Case

K, N_IMAGES, PRUNE_P = 16, 128, 0.02
SHAPES = {"digits": (1, 16), "shapes": (3, 32)}


class _Stamp:
    """A trigger proxy stand-in: a bright 3x3 corner patch, target class 0."""

    target = 0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[..., -3:, -3:] = 2.0
        return x


class _Throughput:
    """Wraps a scorer call; after each call writes masks/s and images/s (fastest call so far) into info."""

    def __init__(self, scorer: MaskScorer, prune: torch.Tensor, info: dict):
        self.scorer, self.prune, self.info = scorer, prune, info
        self.best = float("inf")

    def __call__(self):
        t0 = time.perf_counter()
        out = self.scorer(self.prune)
        self.best = min(self.best, time.perf_counter() - t0)
        masks, images = len(self.prune), len(self.prune) * self.scorer.images_per_mask()
        self.info.update(masks_per_s=round(masks / self.best, 2), images_per_s=round(images / self.best, 1))
        self.info["note"] = (f"{self.info['backend']}: {masks / self.best:.1f} masks/s, "
                             f"{images / self.best:.0f} images/s")
        return out


def cases(quick: bool) -> list[Case]:
    names = ["digits"] if quick else list(SHAPES)
    return [case for name in names for case in _model_cases(name, quick)]


def _model_cases(name: str, quick: bool) -> list[Case]:
    """The hooks and engine cases of one model shape (a function scope, so closures bind this model)."""
    channels, size = SHAPES[name]
    torch.manual_seed(0)
    model = build("preactresnet18", in_channels=channels, width=0.5, input_size=size).eval()
    g = torch.Generator().manual_seed(1)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            c = mod.num_features
            mod.running_mean.copy_(torch.rand(c, generator=g) * 0.2 - 0.1)
            mod.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    x = torch.randn(N_IMAGES, channels, size, size, generator=g)
    y = torch.arange(N_IMAGES) % 10
    groups = find_groups(model, (channels, size, size))
    prune = torch.rand(K, groups.num_groups, generator=g) < PRUNE_P
    title = f"repair policy phase: reward of one RL iteration, {name} model (preactresnet18 w=0.5 {channels}x{size}x{size}) K={K}"
    out = []
    for impl, backend, precision in (("hooks", "hooks", "float32"), ("engine", "engine", "float32"),
                                     ("engine_bf16", "engine", "bfloat16")):
        scorer = MaskScorer(groups, model, x, y, RewardWeights(), trigger=_Stamp(), backend=backend,
                            precision=precision)
        info = {"model": name, "K": K, "images_per_mask": scorer.images_per_mask(), "backend": backend,
                "precision": precision}
        out.append(Case(title, impl, _Throughput(scorer, prune, info),
                        baseline=None if impl == "hooks" else "hooks", repeats=2 if quick else 3, info=info))
    return out
