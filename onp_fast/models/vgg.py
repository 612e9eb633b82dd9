"""VGG-16/19 with batch norm, torchvision's parameter names (`features.N`, `classifier.0/3/6`).

Max-pools use ceil_mode so any input size from 1 pixel up works (identical to torchvision for sizes
divisible by 32). Small inputs (<= 64) default to a 1x1 adaptive pool and a 512-wide classifier; larger
ones to torchvision's 7x7 pool and 4096-wide classifier. `pool` and `hidden` override that (a checkpoint's
values are read from its `classifier.0.weight`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .common import is_small_input, scaled

_CFGS = {
    "vgg16_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, cfg: list, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                 pool: int = 1, hidden: int = 512):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            else:
                cout = scaled(v, width)
                layers += [nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((pool, pool))
        self.classifier = nn.Sequential(
            nn.Linear(cin * pool * pool, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] float32, normalised -> logits [B, num_classes]."""
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _vgg(name: str, num_classes, in_channels, width, input_size, pool, hidden) -> VGG:
    small = is_small_input(input_size)
    pool = pool if pool is not None else (1 if small else 7)
    hidden = hidden if hidden is not None else scaled(512 if small else 4096, width)
    return VGG(_CFGS[name], num_classes, in_channels, width, pool, hidden)


def vgg16_bn(num_classes=10, in_channels=3, width=1.0, input_size=32, pool=None, hidden=None) -> VGG:
    return _vgg("vgg16_bn", num_classes, in_channels, width, input_size, pool, hidden)


def vgg19_bn(num_classes=10, in_channels=3, width=1.0, input_size=32, pool=None, hidden=None) -> VGG:
    return _vgg("vgg19_bn", num_classes, in_channels, width, input_size, pool, hidden)
