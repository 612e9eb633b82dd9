"""What the reward engine masks: mask sites and the masks that reach them.

A *mask site* (MaskSite) is a place in a model where activations are multiplied channel-wise by a mask: the
output (site "out") or the input (site "in") of a module. Two ways to say which sites and masks:

- NeuronSet: explicit BatchNorm channel units, a mask [K, N] over flat neuron indices (`bn_neurons`: every BN
  channel, in module order; masking a BN channel multiplies its output by m). A group mask [K, G] expands to
  neuron masks [K, N] with `expand_groups`.
- GroupPoints: the mask points of neuron groups (onp_fast.groups): BN/LayerNorm outputs, conv/linear outputs no
  norm follows, attention-head input slices; a mask is a group mask [K, G], every point of group g multiplied
  by mask[:, g] (the keep factor: 0/1, soft, or a perturbed 1 + delta).
Both give the engine `sites(model)` and `site_masks(masks) -> {(module, site): [K, C]}`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ..errors import UserError
from ..groups import NeuronGroups

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class MaskSite:
    """The output (site "out") or input (site "in") of module `module` (a qualified name), `channels` channels
    along tensor dim `dim` of its [B, ...] activation."""

    module: str
    site: str
    dim: int
    channels: int

    @property
    def key(self) -> tuple[str, str]:
        return (self.module, self.site)


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

    max_value = 1.0  # masks lie in [0, max_value]

    def sites(self, model: nn.Module) -> list[MaskSite]:
        """The BN outputs this set masks on `model` (channel dim 1); UserError when a unit does not fit."""
        return [MaskSite(name, "out", 1, mod.num_features) for name, mod in self.validate(model).items()]

    def site_masks(self, masks: torch.Tensor, sites: list[MaskSite]) -> dict[tuple[str, str], torch.Tensor]:
        """masks [K, N] -> {(module, "out"): [K, C]} (1 where no unit)."""
        channels = {s.module: s.channels for s in sites}
        return {(name, "out"): m for name, m in self.module_masks(masks, channels).items()}

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


class GroupPoints:
    """The mask points of `groups` as engine sites; a mask is a group mask [K, G] (G = groups.num_groups) of
    non-negative keep factors. Site (module, site) channel c takes mask[:, groups.point_index(...)[c]], or 1
    where no group masks it (exactly `groups.masked`'s multiplier)."""

    max_value = float("inf")

    def __init__(self, groups: NeuronGroups):
        self.groups = groups
        g = groups.num_groups
        # per site: the group of each channel, G (the padding column of ones) where none
        self._index = {key: torch.as_tensor(np.where(groups.point_index(key) >= 0, groups.point_index(key), g),
                                            dtype=torch.int64) for key in groups.point_keys}

    @property
    def size(self) -> int:
        return self.groups.num_groups

    def sites(self, model: nn.Module) -> list[MaskSite]:
        """Every masked place of the groups, in model order; UserError when `model` lacks a module of them."""
        named = dict(model.named_modules())
        out = []
        for (module, site), idx in self._index.items():
            if module not in named:
                raise UserError(f"mask point {module!r} is not a module of the model")
            out.append(MaskSite(module, site, self.groups.point_dim((module, site)), len(idx)))
        return out

    def site_masks(self, masks: torch.Tensor, sites: list[MaskSite]) -> dict[tuple[str, str], torch.Tensor]:
        """masks [K, G] -> {(module, site): [K, C]} (1 where no group)."""
        padded = torch.cat([masks, masks.new_ones(masks.shape[0], 1)], dim=1)
        return {s.key: padded.index_select(1, self._index[s.key].to(masks.device)) for s in sites}
