"""Model zoo: a registry of architectures by name.

`build(name, num_classes=10, in_channels=3, width=1.0, input_size=32, **extra)` returns a fresh nn.Module
that takes *normalised* input [B, in_channels, input_size, input_size] float32 and returns logits
[B, num_classes]. The built module carries `onp_arch` (its registry name) and `onp_arch_kwargs` (the
kwargs that rebuild it), which checkpoints store.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from ..errors import UserError
from .mobilenet import mobilenet_v2
from .preact_resnet import preactresnet18, preactresnet34
from .resnet import resnet18, resnet34, resnet50
from .vgg import vgg16_bn, vgg19_bn
from .vit import vit_b_16, vit_small

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "preactresnet18": preactresnet18,
    "preactresnet34": preactresnet34,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "vgg16_bn": vgg16_bn,
    "vgg19_bn": vgg19_bn,
    "mobilenet_v2": mobilenet_v2,
    "vit_small": vit_small,
    "vit_b_16": vit_b_16,
}

# Other spellings (BackdoorBench's `model_name`s, common variants) -> registry name.
_ALIASES = {
    "preactresnet": "preactresnet18",
    "preact_resnet18": "preactresnet18",
    "preact-resnet18": "preactresnet18",
    "preact_resnet34": "preactresnet34",
    "mobilenetv2": "mobilenet_v2",
    "vit_s": "vit_small",
    "vit_small_patch16": "vit_small",
    "vit_b16": "vit_b_16",
}


def names() -> list[str]:
    """The registered architecture names."""
    return list(_REGISTRY)


def canonical_name(name: str) -> str:
    """Registry name for `name` or one of its aliases (case-insensitive); UserError if unknown."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise UserError(f"unknown architecture {name!r}: choose one of {', '.join(names())}")
    return key


def build(name: str, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, input_size: int = 32,
          **extra) -> nn.Module:
    """A fresh model `name` (see names()); `extra` are family options (e.g. stem='imagenet', depth=4)."""
    key = canonical_name(name)
    if num_classes < 1 or in_channels < 1 or input_size < 1 or not width > 0:
        raise UserError(
            f"bad model options for {key}: num_classes={num_classes}, in_channels={in_channels}, "
            f"width={width}, input_size={input_size} (all must be positive)"
        )
    kwargs = dict(num_classes=int(num_classes), in_channels=int(in_channels), width=float(width),
                  input_size=int(input_size), **extra)
    try:
        model = _REGISTRY[key](**kwargs)
    except TypeError as exc:
        raise UserError(f"bad option for {key}: {exc}") from None
    except ValueError as exc:
        raise UserError(f"cannot build {key}: {exc}") from None
    model.onp_arch = key
    model.onp_arch_kwargs = kwargs
    return model


def prunable_neuron_count(model: nn.Module) -> int:
    """Neurons a pruner can mask: BatchNorm channels plus ViT MLP hidden units (fc1 outputs).

    A simple count; the repair step traces the real units and coupled groups.
    """
    from .vit import Mlp

    total = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            total += m.num_features
        elif isinstance(m, Mlp):
            total += m.fc1.out_features
    return total


__all__ = ["build", "names", "canonical_name", "prunable_neuron_count"]
