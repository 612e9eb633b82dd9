"""find_groups: trace a model, propagate channel spaces, collect mask points into coupling groups."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import UserError
from .channels import ChannelTracer
from .trace import trace

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class MaskPoint:
    """Channel `channel` of module `module`'s output (site "out") or input (site "in"), along dim `dim`."""

    module: str
    site: str
    channel: int
    dim: int


@dataclass
class Group:
    """One pruning decision. kind: "channel" (one layer's channel), "coupled" (tied by adds/concats),
    "head" (an attention head). `rows`: (layer name, output row) of the conv/linear weights it owns."""

    index: int
    kind: str
    points: list[MaskPoint] = field(default_factory=list)
    rows: list[tuple[str, int]] = field(default_factory=list)


class NeuronGroups:
    """The groups of a model. `layers`: conv/linear names whose output rows are neurons (graph layers),
    `layer_groups[name]`: int64 [C_out] group of each row (-1: not prunable, e.g. the logits)."""

    def __init__(self, groups: list[Group], layers: list[str], layer_groups: dict[str, np.ndarray],
                 point_dims: dict[tuple[str, str], tuple[int, int]],
                 module_channels: dict[str, tuple[np.ndarray | None, np.ndarray | None]] | None = None):
        self.groups = groups
        # module name -> (group of each input channel, group of each output channel), -1 where none.
        self.module_channels = module_channels or {}
        self.layers = layers
        self.layer_groups = layer_groups
        # (module, site) -> group index per channel [C] int64 (-1: untouched), and the channel dim.
        self._index: dict[tuple[str, str], np.ndarray] = {}
        self._dim: dict[tuple[str, str], int] = {}
        for key, (channels, dim) in point_dims.items():
            self._index[key] = np.full(channels, -1, dtype=np.int64)
            self._dim[key] = dim
        for g in groups:
            for p in g.points:
                self._index[(p.module, p.site)][p.channel] = g.index

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def point_keys(self) -> list[tuple[str, str]]:
        """(module, site) of every masked place, in model order."""
        return [k for k, v in self._index.items() if (v >= 0).any()]

    def point_index(self, key: tuple[str, str]) -> np.ndarray:
        """int64 [C]: the group of each channel at this place, -1 where no group masks it."""
        return self._index[key]

    def point_dim(self, key: tuple[str, str]) -> int:
        return self._dim[key]

    def channel_masks(self, keep: torch.Tensor) -> dict[tuple[str, str], torch.Tensor]:
        """keep [K, G] (or [G]) float -> {(module, site): [K, C] (or [C]) multiplier, 1 where no group}."""
        squeeze = keep.dim() == 1
        keep2 = keep.reshape(-1, self.num_groups)
        ones = torch.ones(keep2.shape[0], 1, dtype=keep2.dtype, device=keep2.device)
        padded = torch.cat([keep2, ones], dim=1)  # index -1 picks the trailing 1
        out = {}
        for key in self.point_keys:
            idx = torch.as_tensor(self._index[key], device=keep2.device)
            m = padded[:, idx]
            out[key] = m[0] if squeeze else m
        return out

    @contextlib.contextmanager
    def masked(self, model: nn.Module, keep: torch.Tensor):
        """Within the block, model's forward multiplies every mask point by keep [G] (hooks; keep may live on
        another device than the model: it is moved, differentiably, to each activation's)."""
        modules = dict(model.named_modules())
        handles = []
        for (name, site), m in self.channel_masks(keep).items():
            dim = self._dim[(name, site)]

            def scale(t, m=m, dim=dim):
                shape = [1] * t.dim()
                shape[dim] = -1
                return t * m.to(t.device, t.dtype).view(shape)

            if site == "out":
                handles.append(modules[name].register_forward_hook(lambda mod, inp, out, s=scale: s(out)))
            else:
                handles.append(modules[name].register_forward_pre_hook(
                    lambda mod, inp, s=scale: (s(inp[0]),) + tuple(inp[1:])))
        try:
            yield model
        finally:
            for h in handles:
                h.remove()

    def reduce(self, parts, how: str = "mean") -> torch.Tensor:
        """Per-group reduction of per-channel values. parts: iterable of (group of each channel [C] int64, -1 =
        none; values [C] or [C, F]) pairs, e.g. one per layer or mask point. how "mean": the mean over all of
        a group's channels in all parts (0 for a group with none); "max": the max (-inf for a group with
        none). Values may live on any device. -> [G] or [G, F] float32, on the CPU."""
        index, values = [], []
        for gidx, v in parts:
            gi = torch.as_tensor(gidx).cpu()
            sel = gi >= 0
            index.append(gi[sel])
            values.append(v.detach().cpu()[sel])
        if not values:
            return torch.full((self.num_groups,), 0.0 if how == "mean" else -float("inf"))
        index, v = torch.cat(index), torch.cat(values)
        shape = (self.num_groups,) + tuple(v.shape[1:])
        idx = index.view(-1, *([1] * (v.dim() - 1))).expand_as(v)
        if how == "max":
            return torch.full(shape, -float("inf")).scatter_reduce_(0, idx, v.float(), "amax", include_self=True)
        if how != "mean":
            raise ValueError(f"how must be 'mean' or 'max', got {how!r}")
        total = torch.zeros(shape, dtype=torch.float64).index_add_(0, index, v.double())
        count = torch.zeros(self.num_groups, dtype=torch.float64).index_add_(
            0, index, torch.ones(len(index), dtype=torch.float64))
        return (total / count.clamp(min=1).view(-1, *([1] * (v.dim() - 1)))).float()

    def pruned_copy(self, model: nn.Module, prune: torch.Tensor) -> nn.Module:
        """A deep copy of `model` with the groups prune [G] bool zeroed in its weights (`prune_`)."""
        return self.prune_(copy.deepcopy(model), ~prune.bool())

    @torch.no_grad()
    def prune_(self, model: nn.Module, keep: torch.Tensor) -> nn.Module:
        """Zeroes, in place, the weights that carry every group with keep [G] == False (hard mask)."""
        modules = dict(model.named_modules())
        drop = ~keep.bool().cpu()
        for key in self.point_keys:
            name, site = key
            idx = torch.as_tensor(self._index[key])
            chans = torch.nonzero((idx >= 0) & drop[idx.clamp(min=0)]).flatten()
            if chans.numel() == 0:
                continue
            mod = modules[name]
            chans = chans.to(mod.weight.device)
            if site == "in":
                mod.weight[:, chans] = 0
                continue
            mod.weight[chans] = 0
            if getattr(mod, "bias", None) is not None:
                mod.bias[chans] = 0
        return model


def find_groups(model: nn.Module, input_shape: tuple[int, ...]) -> NeuronGroups:
    """Traces `model` on a zero input [2, *input_shape] and returns its neuron groups.

    Raises UserError when the model cannot be traced or has no prunable neuron.
    """
    was_training = model.training
    model.eval()
    try:
        gm = trace(model)
        param = next(model.parameters(), None)
        x = torch.zeros(2, *input_shape, dtype=param.dtype if param is not None else torch.float32,
                        device=param.device if param is not None else None)
        with torch.no_grad():
            try:
                ShapeProp(gm).propagate(x)
            except Exception as exc:  # noqa: BLE001
                raise UserError(
                    f"the model rejects inputs of shape {tuple(input_shape)}: {str(exc).splitlines()[0]}") from None
    finally:
        model.train(was_training)
    tracer = ChannelTracer(gm).run()
    return _collect(gm, tracer)


def _collect(gm: fx.GraphModule, tr: ChannelTracer) -> NeuronGroups:
    modules = dict(gm.named_modules())
    uf = tr.uf
    frozen = {uf.find(int(i)) for ids in tr.output_ids + tr.input_ids for i in ids}
    users: dict[str, list] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            users[node.target] = [u for u in node.users]

    def only_norms_follow(name: str) -> bool:
        us = users.get(name, [])
        return bool(us) and all(u.op == "call_module" and isinstance(modules[u.target], _NORMS) for u in us)

    by_root: dict[int, Group] = {}
    groups: list[Group] = []
    point_dims: dict[tuple[str, str], tuple[int, int]] = {}

    def group_for(root: int, kind: str) -> Group:
        if root not in by_root:
            by_root[root] = Group(index=len(groups), kind=kind)
            groups.append(by_root[root])
        return by_root[root]

    layers: list[str] = []
    layer_groups: dict[str, np.ndarray] = {}
    producers: dict[int, set[str]] = {}
    for name, space in tr.module_out.items():
        mod = modules[name]
        roots = [uf.find(int(i)) for i in space.ids]
        is_point = isinstance(mod, _NORMS) and getattr(mod, "weight", None) is not None
        is_point |= isinstance(mod, _WEIGHTED) and not only_norms_follow(name)
        if isinstance(mod, _WEIGHTED):
            layers.append(name)
            depthwise = getattr(mod, "groups", 1) > 1 and getattr(mod, "groups", 1) == getattr(mod, "out_channels", 0)
            for r in roots if not depthwise else ():
                producers.setdefault(r, set()).add(name)
        if not is_point:
            continue
        point_dims[(name, "out")] = (len(roots), space.dim)
        for c, r in enumerate(roots):
            if r not in frozen:
                group_for(r, "channel").points.append(MaskPoint(name, "out", c, space.dim))
    for g_root, g in by_root.items():
        if len(producers.get(g_root, ())) > 1:
            g.kind = "coupled"
    def as_groups(space):
        """Space -> int64 [C]: the group of each channel, -1 where none (None for no space)."""
        if space is None:
            return None
        return np.array([by_root[r].index if r in by_root else -1 for r in (uf.find(int(i)) for i in space.ids)],
                        dtype=np.int64)

    for name in layers:
        idx = as_groups(tr.module_out[name])
        layer_groups[name] = idx
        for row, g in enumerate(idx.tolist()):
            if g >= 0:
                groups[g].rows.append((name, row))
    # Attention heads: one group per head, masked at the input of the output projection.
    for name, mod in modules.items():
        proj = getattr(mod, "proj", None)
        if hasattr(mod, "num_heads") and isinstance(proj, nn.Linear) and name in tr.module_out:
            heads, dim = int(mod.num_heads), proj.in_features
            point_dims[(f"{name}.proj", "in")] = (dim, 2)
            for h in range(heads):
                g = Group(index=len(groups), kind="head")
                step = dim // heads
                g.points = [MaskPoint(f"{name}.proj", "in", c, 2) for c in range(h * step, (h + 1) * step)]
                groups.append(g)
    if not groups:
        raise UserError("the model has no prunable neurons (no conv/linear/norm channel outside the input and logits)")

    module_channels = {name: (as_groups(tr.module_in.get(name)), as_groups(tr.module_out.get(name)))
                       for name in set(tr.module_in) | set(tr.module_out)}
    return NeuronGroups(groups, layers, layer_groups, point_dims, module_channels)

