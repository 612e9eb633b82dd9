"""The Attack interface and registry.

An attack owns a trigger for one image shape (C, H, W). Triggers act on [0, 1] pixel images before
normalisation. Every attack is seeded: the same (image_shape, seed, params) rebuilds the same trigger, so a
JSON spec (`spec()` / `from_spec`) is all evaluation needs.

- `poison_training_set(...)`: which images are poisoned and how (clean-label attacks poison only
  target-class images and keep their labels); returns a `PoisonedSet` that may carry a per-batch
  `transform` for attacks poisoned during training (WaNet's noise mode; InputAware's generator).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable, ClassVar

import torch

from ..errors import UserError

# transform(xb [B,C,H,W] float32 pixels, yb [B] int64, generator) -> (xb, yb), applied per training batch.
BatchTransform = Callable[[torch.Tensor, torch.Tensor, torch.Generator], "tuple[torch.Tensor, torch.Tensor]"]


@dataclasses.dataclass
class PoisonedSet:
    """A training set ready for `train_classifier`.

    x: [N, C, H, W] float32 pixels in [0, 1]; y: [N] int64 training labels (target for dirty-label poison);
    poisoned_index: [P] int64 rows of x that carry the trigger (static poison; empty when the attack poisons
    per batch); transform: optional per-batch hook (see `BatchTransform`).
    """

    x: torch.Tensor
    y: torch.Tensor
    poisoned_index: torch.Tensor
    transform: BatchTransform | None = None


class Attack:
    """Base class: subclasses set `name`, implement `apply` and list their parameters in `params()`."""

    name: ClassVar[str] = ""
    clean_label: ClassVar[bool] = False  # poison target-class images only, keep their labels

    def __init__(self, image_shape, seed: int = 0):
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise UserError(f"{self.name}: image shape must be (C, H, W), got {tuple(image_shape)}")
        self.image_shape = shape
        self.seed = int(seed)

    # -- trigger -------------------------------------------------------------------------------------
    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, C, H, W] float pixels in [0, 1] -> triggered copy, same shape and dtype, in [0, 1]."""
        raise NotImplementedError

    def params(self) -> dict:
        """The attack's own parameters (JSON types), enough with image_shape and seed to rebuild it."""
        return {}

    # -- spec ------------------------------------------------------------------------------------------
    def spec(self) -> dict:
        """JSON-serialisable description that `from_spec` turns back into the same attack."""
        return {"name": self.name, "image_shape": list(self.image_shape), "seed": self.seed,
                "params": self.params()}

    # -- poisoning ---------------------------------------------------------------------------------
    def poison_index(self, y: torch.Tensor, rate: float, target: int, generator: torch.Generator) -> torch.Tensor:
        """y: [N] int64 labels -> [P] int64 sorted rows to poison, P = round(rate * N).

        Dirty-label attacks draw from the non-target images; clean-label attacks from the target class
        only (so P is capped by the target-class count).
        """
        pool = torch.nonzero(y == target if self.clean_label else y != target).flatten()
        count = min(int(round(rate * y.numel())), pool.numel())
        if count < 1:
            raise UserError(f"{self.name}: poison rate {rate} selects no training image "
                            f"({pool.numel()} eligible of {y.numel()})")
        pick = torch.randperm(pool.numel(), generator=generator)[:count]
        return pool[pick].sort().values

    def poison_training_set(self, x: torch.Tensor, y: torch.Tensor, rate: float, target: int,
                            generator: torch.Generator) -> PoisonedSet:
        """x: [N, C, H, W] float32 pixels, y: [N] int64 -> PoisonedSet with triggered rows (static poison)."""
        index = self.poison_index(y, rate, target, generator)
        x = x.clone()
        y = y.clone()
        x[index] = self.apply(x[index])
        if not self.clean_label:
            y[index] = target
        return PoisonedSet(x=x, y=y, poisoned_index=index)

    def _check(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise UserError(f"{self.name}: expected images [B, {', '.join(map(str, self.image_shape))}], "
                            f"got {list(images.shape)}")
        if not images.is_floating_point():
            raise UserError(f"{self.name}: expected float pixels in [0, 1], got {images.dtype}")


_REGISTRY: dict[str, type[Attack]] = {}


def register(cls: type[Attack]) -> type[Attack]:
    """Class decorator: adds an attack to the registry under `cls.name`."""
    _REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    """Registered attack names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> type[Attack]:
    key = str(name).lower()
    if key not in _REGISTRY:
        raise UserError(f"unknown attack {name!r}; valid: {', '.join(names())}")
    return _REGISTRY[key]


def build(name: str, image_shape, seed: int = 0, **params) -> Attack:
    """Builds the named attack for images of `image_shape` (C, H, W)."""
    cls = get(name)
    try:
        return cls(image_shape, seed=seed, **params)
    except TypeError as exc:
        raise UserError(f"{name}: bad parameters {sorted(params)} ({exc})") from None


def parse_params(items) -> dict:
    """('s=1.0', 'size=3') -> {'s': 1.0, 'size': 3}: values are JSON, else kept as strings."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"attack parameter {item!r} must look like KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def params_by_attack(items) -> dict[str, dict]:
    """('sig.train_delta=0.098', ...) -> {'sig': {'train_delta': 0.098}} (for scripts running several attacks)."""
    out: dict[str, list] = {}
    for item in items:
        name, dot, rest = item.partition(".")
        if not dot:
            raise UserError(f"attack parameter {item!r} must look like ATTACK.KEY=VALUE")
        get(name)
        out.setdefault(name.strip().lower(), []).append(rest)
    return {name: parse_params(rest) for name, rest in out.items()}


def from_spec(spec: dict) -> Attack:
    """Rebuilds an attack from `Attack.spec()` output."""
    if not isinstance(spec, dict) or "name" not in spec or "image_shape" not in spec:
        raise UserError("attack spec must be a JSON object with 'name' and 'image_shape'")
    params = spec.get("params") or {}
    if not isinstance(params, dict):
        raise UserError("attack spec: 'params' must be a JSON object")
    attack = build(spec["name"], spec["image_shape"], seed=int(spec.get("seed", 0)), **params)
    if spec.get("state") is not None:  # learned triggers (LC, LF, TrojanNN) are not implemented
        raise UserError(f"{attack.name}: this attack has no learned state to load")
    return attack
