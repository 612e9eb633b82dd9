"""Poisoned training: build the poisoned training set for an attack and train a backdoored classifier.

Defaults follow BackdoorBench: all-to-one, target class 0, poison rate 0.1 of the training set. Dirty-label
attacks trigger non-target images and relabel them to the target; clean-label attacks (SIG) trigger
target-class images only and keep their labels; WaNet poisons per batch with its noise mode.
"""
from __future__ import annotations

import torch

from .attacks import Attack, PoisonedSet
from .errors import UserError

DEFAULT_RATE = 0.1
DEFAULT_TARGET = 0


def check_rate(rate: float) -> float:
    """The poison rate as a float in (0, 1]; UserError otherwise."""
    rate = float(rate)
    if not 0.0 < rate <= 1.0:
        raise UserError(f"poison rate must be in (0, 1], got {rate:g}")
    return rate


def check_target(target: int, num_classes: int) -> int:
    """The target class as an int in [0, num_classes); UserError otherwise."""
    if int(target) != target or not 0 <= int(target) < num_classes:
        raise UserError(f"target class {target} is outside the classes 0..{num_classes - 1}")
    return int(target)


def poison_training_set(attack: Attack, x: torch.Tensor, y: torch.Tensor, *, num_classes: int,
                        rate: float = DEFAULT_RATE, target: int = DEFAULT_TARGET, seed: int = 0) -> PoisonedSet:
    """x: [N, C, H, W] float32 pixels in [0, 1], y: [N] int64 -> the attack's PoisonedSet (seeded choice)."""
    rate = check_rate(rate)
    target = check_target(target, num_classes)
    if tuple(x.shape[1:]) != attack.image_shape:
        raise UserError(f"{attack.name} was built for images {list(attack.image_shape)}, "
                        f"the data set has {list(x.shape[1:])}")
    generator = torch.Generator().manual_seed(int(seed))
    return attack.poison_training_set(x, y, rate, target, generator)


def train_backdoored(model: torch.nn.Module, attack: Attack, splits, *, epochs: int,
                     rate: float = DEFAULT_RATE, target: int = DEFAULT_TARGET, seed: int = 0,
                     batch_size: int = 128, lr: float | None = None, progress: bool = True) -> PoisonedSet:
    """Trains `model` in place on the poisoned training split of `splits` (a DataSplits); returns the set.
    Same seed: same poisoned set, same weights."""
    from .train import train_classifier

    train_kwargs = dict(epochs=epochs, mean=splits.mean, std=splits.std, batch_size=batch_size, seed=seed,
                        progress=progress)
    if lr is not None:
        train_kwargs["lr"] = lr
    poisoned = poison_training_set(attack, splits.train_x, splits.train_y, num_classes=splits.num_classes,
                                   rate=rate, target=target, seed=seed)
    train_classifier(model, poisoned.x, poisoned.y, transform=poisoned.transform,
                     desc=f"train {attack.name}", **train_kwargs)
    return poisoned
