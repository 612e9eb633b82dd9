"""MobileNetV2 with torchvision's parameter names (`features.0.0`/`features.0.1` stem, inverted residual
blocks `features.N.conv.*`, `features.18` last 1x1 conv, `classifier.1`).

Small inputs (<= 64) use stride 1 in the stem and the second stage (the usual CIFAR adaptation: 32x32 ends
at 4x4 instead of 1x1) unless small=False; strides are not stored in the weights, so a checkpoint keeps
`small` in its arch kwargs (BackdoorBench's mobilenet_v2 is torchvision's: small=False).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .common import is_small_input, make_divisible

# t (expansion), c (channels), n (repeats), s (stride)
_SETTINGS = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]


class ConvBNReLU(nn.Sequential):
    """conv -> BN -> ReLU6 (torchvision's Conv2dNormActivation: children `0`, `1`, `2`)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden, kernel_size=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, inp, H, W] -> [B, oup, H/stride, W/stride]."""
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, small: bool = True,
                 dropout: float = 0.2):
        super().__init__()
        cin = make_divisible(32 * width)
        last = make_divisible(1280 * max(1.0, width))
        features: list[nn.Module] = [ConvBNReLU(in_channels, cin, stride=1 if small else 2)]
        for i, (t, c, n, s) in enumerate(_SETTINGS):
            cout = make_divisible(c * width)
            if small and i == 1:
                s = 1
            for j in range(n):
                features.append(InvertedResidual(cin, cout, s if j == 0 else 1, t))
                cin = cout
        features.append(ConvBNReLU(cin, last, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] float32, normalised -> logits [B, num_classes]."""
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes=10, in_channels=3, width=1.0, input_size=32, small=None) -> MobileNetV2:
    """`small`: CIFAR strides (default: input_size <= 64); False gives torchvision's ImageNet strides."""
    return MobileNetV2(num_classes, in_channels, width, small=is_small_input(input_size) if small is None else small)
