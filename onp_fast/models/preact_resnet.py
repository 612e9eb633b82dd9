"""PreAct-ResNet-18/34 with BackdoorBench's exact structure and parameter names.

Stem `conv1` (3x3, no BN after it), `layer1`..`layer4` of `PreActBlock`s (`bn1`, `conv1`, `bn2`, `conv2`,
and `shortcut.0`, a 1x1 conv, where the shape changes), `avgpool` (adaptive, 1x1) and `linear`; no BN before
the pooling. BackdoorBench's `attack_result.pt` state_dicts load into these as they are.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import scaled


class PreActBlock(nn.Module):
    """Pre-activation basic block: out = conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_planes, H, W] float -> [B, planes, H/stride, W/stride]."""
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """PreActResNet; `width` scales the stage widths 64/128/256/512 (e.g. 0.25 -> 16/32/64/128)."""

    def __init__(self, num_blocks: list[int], num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        planes = [scaled(64 * 2**i, width) for i in range(4)]
        self.in_planes = planes[0]
        self.conv1 = nn.Conv2d(in_channels, planes[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(planes[0], num_blocks[0], stride=1)
        self.layer2 = self._make_layer(planes[1], num_blocks[1], stride=2)
        self.layer3 = self._make_layer(planes[2], num_blocks[2], stride=2)
        self.layer4 = self._make_layer(planes[3], num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(planes[3] * PreActBlock.expansion, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes * PreActBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] float32, normalised -> logits [B, num_classes]."""
        out = self.conv1(x)
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.layer4(out)
        out = self.avgpool(out)
        out = torch.flatten(out, 1)
        return self.linear(out)


def preactresnet18(num_classes=10, in_channels=3, width=1.0, input_size=32) -> PreActResNet:
    return PreActResNet([2, 2, 2, 2], num_classes, in_channels, width)


def preactresnet34(num_classes=10, in_channels=3, width=1.0, input_size=32) -> PreActResNet:
    return PreActResNet([3, 4, 6, 3], num_classes, in_channels, width)
