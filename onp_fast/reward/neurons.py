"""Maskable neurons as an explicit list: which module's channels each flat neuron index n in [0, N) is.

`bn_neurons`: every BatchNorm channel, in module order (masking a BN channel multiplies its output by m).
A group mask [K, G] expands to neuron masks [K, N] with `expand_groups`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import UserError

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class NeuronUnit:
    """Channels [start, stop) of the BN module `module` (a qualified name); flat indices [offset, offset+stop-start)."""

    module: str
    start: int
    stop: int
    offset: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class NeuronSet:
    """An ordered list of NeuronUnits covering flat indices [0, N) without gaps."""

    units: tuple[NeuronUnit, ...]

    @property
    def size(self) -> int:
        return sum(u.size for u in self.units)

    def modules(self) -> list[str]:
        """Module names with at least one unit, in first-appearance order."""
        return list(dict.fromkeys(u.module for u in self.units))

    def module_masks(self, masks: torch.Tensor, channels: dict[str, int]) -> dict[str, torch.Tensor]:
        """masks [K, N] float -> {module: [K, C] float}; channels no unit covers keep mask 1."""
        out: dict[str, torch.Tensor] = {}
        for u in self.units:
            if u.module not in out:
                out[u.module] = masks.new_ones(masks.shape[0], channels[u.module])
            out[u.module][:, u.start:u.stop] = masks[:, u.offset:u.offset + u.size]
        return out

    def validate(self, model: nn.Module) -> dict[str, nn.Module]:
        """{module name: BN module} for this set on `model`; UserError when a unit does not fit the model."""
        named = dict(model.named_modules())
        found = {}
        expected = 0
        for u in self.units:
            mod = named.get(u.module)
            if not isinstance(mod, _BN_TYPES):
                raise UserError(f"neuron unit {u.module!r} is not a BatchNorm module of the model "
                                "(only BatchNorm channels are maskable for now)")
            if not (0 <= u.start < u.stop <= mod.num_features) or u.offset != expected:
                raise UserError(f"neuron unit {u} does not fit {u.module!r} ({mod.num_features} channels)")
            expected += u.size
            found[u.module] = mod
        return found


def bn_neurons(model: nn.Module) -> NeuronSet:
    """Every BatchNorm channel of `model`, in module order."""
    units, offset = [], 0
    for name, mod in model.named_modules():
        if isinstance(mod, _BN_TYPES):
            units.append(NeuronUnit(name, 0, mod.num_features, offset))
            offset += mod.num_features
    if not units:
        raise UserError("the model has no BatchNorm layers: no maskable neurons")
    return NeuronSet(tuple(units))


def expand_groups(group_masks: torch.Tensor, neuron_group: torch.Tensor) -> torch.Tensor:
    """group_masks [K, G] float, neuron_group [N] int64 (each neuron's group) -> neuron masks [K, N]."""
    return group_masks.index_select(1, neuron_group)
