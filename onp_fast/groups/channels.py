"""Channel-space propagation over a torch.fx graph.

Every tensor value gets a `Space`: the global channel id of each of its channels and which tensor dim holds
them. Layers that mix channels (conv, linear, attention) create fresh ids; channel-wise ops (BN, LN,
activations, pooling, depthwise conv) pass ids through; a residual add or mul unifies the ids of its inputs
(union-find), a concat along the channel dim concatenates them. Connected ids are channels that must be
pruned together: the coupling groups (what Torch-Pruning's DepGraph computes).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F


class UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def fresh(self, n: int) -> np.ndarray:
        """n new singleton ids."""
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, i: int) -> int:
        p = self.parent
        root = i
        while p[root] != root:
            root = p[root]
        while p[i] != root:
            p[i], i = root, p[i]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)


@dataclass
class Space:
    """Channel ids `ids` [C] int64 of a tensor whose channels lie along dim `dim` (non-negative)."""

    ids: np.ndarray
    dim: int


# Modules through which channel c of the input is channel c of the output.
_PASS_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d,
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_PASS_FUNCTIONS = {
    F.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.elu, F.hardswish, F.sigmoid, F.dropout, torch.relu,
    torch.sigmoid, torch.tanh, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
    torch.nn.functional.batch_norm, torch.nn.functional.layer_norm, F.hardtanh, torch.clamp,
}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach", "float", "to", "clamp",
                 "clamp_", "type_as"}
_UNIFY = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul, torch.add,
          torch.sub, torch.mul, operator.truediv, torch.div}
_UNIFY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}


def _shape(node) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class ChannelTracer:
    """Propagates Spaces through a shape-propagated fx.GraphModule.

    Results: `spaces` (node name -> Space), `module_in` / `module_out` (module name -> Space of its input /
    output), `uf` (the union-find over channel ids), `output_ids`, `input_ids`.
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.uf = UnionFind()
        self.spaces: dict[str, Space | None] = {}
        self.module_in: dict[str, Space] = {}
        self.module_out: dict[str, Space] = {}
        self.input_ids: list[np.ndarray] = []
        self.output_ids: list[np.ndarray] = []

    # -- helpers ---------------------------------------------------------------------------------------
    def _get(self, arg) -> Space | None:
        return self.spaces.get(arg.name) if isinstance(arg, fx.Node) else None

    def _fresh(self, n: int, dim: int) -> Space:
        return Space(self.uf.fresh(n), dim)

    def _unify(self, node, args) -> Space | None:
        shp = _shape(node)
        spaces = [(a, self._get(a)) for a in args if isinstance(a, fx.Node)]
        spaces = [(a, s) for a, s in spaces if s is not None]
        if not spaces:
            return None
        if shp is None:
            return spaces[0][1]
        nd = len(shp)
        out: Space | None = None
        for a, s in spaces:
            ashp = _shape(a)
            # Right-aligned broadcasting: the operand's dim d is output dim d + (nd - len(ashp)).
            odim = s.dim + (nd - len(ashp)) if ashp is not None else s.dim
            if shp[odim] != len(s.ids):
                continue  # broadcast along the channel dim (e.g. a per-sample scale): no coupling
            if out is None:
                out = Space(s.ids, odim)
            elif out.dim == odim:
                self.uf.union(out.ids, s.ids)
        return out

    # -- per-node rules --------------------------------------------------------------------------------
    def run(self) -> "ChannelTracer":
        for node in self.gm.graph.nodes:
            self.spaces[node.name] = self._visit(node)
        return self

    def _visit(self, node: fx.Node) -> Space | None:
        shp = _shape(node)
        if node.op == "placeholder":
            if shp is None or len(shp) < 2:
                return None
            s = self._fresh(shp[1], 1)
            self.input_ids.append(s.ids)
            return s
        if node.op == "get_attr":
            return self._fresh(shp[-1], len(shp) - 1) if shp else None
        if node.op == "output":
            for a in _flatten_args(node.args):
                s = self._get(a)
                if s is not None:
                    self.output_ids.append(s.ids)
            return None
        if node.op == "call_module":
            return self._visit_module(node, self.modules[node.target], shp)
        if node.op == "call_function":
            return self._visit_function(node, node.target, shp)
        if node.op == "call_method":
            return self._visit_method(node, node.target, shp)
        return None

    def _visit_module(self, node, mod, shp):
        name = node.target
        x = self._get(node.args[0]) if node.args else None
        if x is not None:
            self.module_in[name] = x
        if isinstance(mod, nn.Conv2d | nn.Conv1d | nn.Conv3d):
            if x is not None and mod.groups == mod.in_channels == mod.out_channels and mod.groups > 1:
                out = Space(x.ids, 1)  # depthwise: channel c stays channel c
            else:
                out = self._fresh(mod.out_channels, 1)
        elif isinstance(mod, nn.Linear):
            out = self._fresh(mod.out_features, len(shp) - 1 if shp else 1)
        elif isinstance(mod, _PASS_MODULES):
            out = Space(x.ids, x.dim) if x is not None else None
        elif isinstance(mod, nn.Flatten):
            out = self._flatten(node, x, mod.start_dim, shp)
        elif shp is not None and len(shp) >= 2:
            # An opaque leaf (e.g. an attention block): fresh channels along the same dim as its input.
            dim = x.dim if x is not None and x.dim < len(shp) else len(shp) - 1
            out = self._fresh(shp[dim], dim)
        else:
            out = None
        if out is not None:
            self.module_out[name] = out
        return out

    def _flatten(self, node, x: Space | None, start: int, shp) -> Space | None:
        src = _shape(node.args[0])
        if x is None or src is None:
            return None
        start = start % len(src)
        if x.dim < start:
            return Space(x.ids, x.dim)
        if x.dim == start:
            inner = int(np.prod(src[start + 1:])) if start + 1 < len(src) else 1
            return Space(np.repeat(x.ids, inner), start)
        # Channel dim folded behind leading dims: only a 1-sized prefix keeps channels intact.
        lead = int(np.prod(src[start:x.dim]))
        if lead == 1:
            inner = int(np.prod(src[x.dim + 1:])) if x.dim + 1 < len(src) else 1
            return Space(np.repeat(x.ids, inner), start)
        return self._fresh(shp[start], start) if shp else None

    def _visit_function(self, node, fn, shp):
        args = node.args
        if fn in _UNIFY:
            return self._unify(node, args)
        if fn in _PASS_FUNCTIONS:
            x = self._get(args[0])
            return Space(x.ids, x.dim) if x is not None else None
        if fn is torch.flatten:
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            return self._flatten(node, self._get(args[0]), start, shp)
        if fn is torch.cat:
            return self._cat(node, args[0], args[1] if len(args) > 1 else node.kwargs.get("dim", 0), shp)
        if fn in (torch.mean, torch.sum, torch.amax):
            return self._reduce(node, self._get(args[0]), args[1] if len(args) > 1 else node.kwargs.get("dim"), shp)
        if fn is operator.getitem:
            return self._getitem(node, self._get(args[0]), args[1], shp)
        if fn is torch.transpose:
            return self._transpose(self._get(args[0]), args[1], args[2], shp)
        return self._fallback(node, shp)

    def _visit_method(self, node, name, shp):
        args = node.args
        x = self._get(args[0]) if args else None
        if name in _UNIFY_METHODS:
            return self._unify(node, args)
        if name in _PASS_METHODS:
            return Space(x.ids, x.dim) if x is not None else None
        if name == "flatten":
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            return self._flatten(node, x, start, shp)
        if name in ("view", "reshape"):
            return self._reshape(node, x, shp)
        if name in ("mean", "sum", "amax"):
            return self._reduce(node, x, args[1] if len(args) > 1 else node.kwargs.get("dim"), shp)
        if name == "transpose":
            return self._transpose(x, args[1], args[2], shp)
        if name == "permute":
            dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            if x is None or shp is None:
                return None
            dims = [d % len(shp) for d in dims]
            return Space(x.ids, dims.index(x.dim))
        if name in ("expand", "repeat"):
            return Space(x.ids, x.dim + (len(shp) - len(_shape(args[0]))) if shp else x.dim) if x else None
        if name in ("size", "dim"):
            return None
        return self._fallback(node, shp)

    def _fallback(self, node, shp):
        """Unknown op: if it keeps its first input's shape, assume it is channel-wise; else fresh channels."""
        first = next((a for a in _flatten_args(node.args) if isinstance(a, fx.Node) and self._get(a)), None)
        if first is not None and _shape(first) == shp and shp is not None:
            x = self._get(first)
            return Space(x.ids, x.dim)
        if shp is not None and len(shp) >= 2:
            return self._fresh(shp[1], 1)
        return None

    def _cat(self, node, tensors, dim, shp):
        spaces = [self._get(t) for t in tensors]
        if shp is None or any(s is None for s in spaces):
            return self._fallback(node, shp)
        dim = dim % len(shp)
        if all(s.dim == dim for s in spaces):
            return Space(np.concatenate([s.ids for s in spaces]), dim)
        # Concatenation along another dim (e.g. a class token before the patch tokens): channels coincide.
        return self._unify(node, tensors)

    def _reduce(self, node, x, dims, shp):
        if x is None or shp is None:
            return None
        src = _shape(node.args[0])
        if dims is None:
            return None
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [d % len(src) for d in dims]
        if x.dim in dims:
            return None
        keep = len(shp) == len(src)
        return Space(x.ids, x.dim if keep else x.dim - sum(d < x.dim for d in dims))

    def _getitem(self, node, x, index, shp):
        if x is None or shp is None:
            return None  # e.g. a tuple output, or x.shape[i]
        index = index if isinstance(index, tuple) else (index,)
        dim, out_dim = 0, 0
        for item in index:
            if item is Ellipsis:
                return self._fallback(node, shp)
            if dim == x.dim:
                if isinstance(item, slice) and item == slice(None):
                    return Space(x.ids, out_dim)
                return self._fresh(shp[out_dim], out_dim) if isinstance(item, slice) else None
            if not isinstance(item, int):
                out_dim += 1
            dim += 1
        return Space(x.ids, out_dim + (x.dim - dim))

    def _transpose(self, x, a, b, shp):
        if x is None or shp is None:
            return None
        a, b = a % len(shp), b % len(shp)
        return Space(x.ids, b if x.dim == a else a if x.dim == b else x.dim)

    def _reshape(self, node, x, shp):
        src = _shape(node.args[0])
        if x is None or shp is None or src is None:
            return None
        # Channels survive a reshape that keeps the product of the leading dims and the channel count.
        lead = int(np.prod(src[:x.dim]))
        acc = 1
        for d, size in enumerate(shp):
            if acc == lead and size == src[x.dim]:
                return Space(x.ids, d)
            acc *= size
        return self._fresh(shp[-1], len(shp) - 1)


def _flatten_args(args):
    out = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out.extend(_flatten_args(a))
        elif isinstance(a, dict):
            out.extend(_flatten_args(list(a.values())))
        else:
            out.append(a)
    return out
