"""A model compiled once (torch.fx) into a masked-forward plan, and its interpreter.

The mask sites (neurons.MaskSite) are put into the traced graph: a BatchNorm output site stays the BN node (run
fused, below); any other site whose module is a graph node gets a `mask` node after its output (site "out") or
before its input (site "in"); a site inside a leaf module (an attention head slice inside an attention block)
is masked by a hook on that submodule while the leaf runs. The graph splits into a static prefix (nodes no
mask reaches: run once per call, shared by all masks) and dynamic steps. Dynamic steps are specialised:
  bn     a masked BN (+ the ReLU that follows it, fused): the bn_mask_relu op, in place where the input is a
         fresh single-use tensor; with a hard (or sparse soft) mask it emits only the kept channels (the
         survivors padded to a multiple of 8, see engine._keep_sets) as a `_Sparse` value when every
         consumer can use that;
  mask   any other site: the activation times the site's mask along its channel dim;
  conv   Conv2d (groups 1, zero padding): a sparse input slices the weight to the surviving input channels
         (fewer FLOPs); a conv whose only consumer is a masked BN computes only that BN's surviving rows;
  linear nn.Linear on a sparse [B, C] input: weight columns sliced;
  pass   channel-wise ops with f(0) = 0 (ReLU, max/avg pooling) apply to the surviving channels only;
  call   anything else (with site hooks when a leaf holds sites): sparse inputs are scattered back to dense,
         then the node runs as traced.
Two ways to run: `run_sliced` (one mask at a time, channel skipping; the CPU path) and `run_batched`
(a chunk of masks folded into the batch dimension, fused ops, no skipping; no Python loop over masks).
"""
from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..groups.trace import trace
from ..ops.masked_forward import bn_mask_relu, bn_mask_relu_
from .neurons import MaskSite

_RELU_FUNCS = {F.relu, torch.relu, torch.relu_}
_PASS_FUNCS = _RELU_FUNCS | {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, torch.max_pool2d}
_PASS_MODULES = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_FRESH_FUNCS = {operator.add, torch.add}
_INPLACE_FUNCS = {operator.iadd, operator.imul, operator.isub, torch.relu_}
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _mask_point(x: torch.Tensor, key: tuple) -> torch.Tensor:
    """Marker of a mask site in the traced graph (key: the site's (module, site)); the identity when the graph
    runs outside the plan's interpreters (e.g. the memory estimate's unmasked pass)."""
    return x


def _mask_values(x: torch.Tensor, m: torch.Tensor, dim: int) -> torch.Tensor:
    """x [Kx, B, ...] (Kx in {1, K}) times m [K, C] along x's dim `dim` + 1 (C channels there) -> [K, B, ...] in
    x's dtype (under autocast the activations may be bfloat16 or float16; the mask follows them)."""
    shape = [m.shape[0]] + [1] * (x.dim() - 1)
    shape[dim + 1] = m.shape[1]
    return x * m.to(x.dtype).view(shape)


class _Sparse:
    """An activation whose channels (dim 1) other than `idx` are all zero: data [B, len(idx), *S] holds the rest.

    channels: the full channel count C; idx: [C'] int64, increasing."""

    __slots__ = ("data", "idx", "channels")

    def __init__(self, data: torch.Tensor, idx: torch.Tensor, channels: int):
        self.data, self.idx, self.channels = data, idx, channels

    def dense(self) -> torch.Tensor:
        """[B, C, *S] with zeros in the dropped channels, in data's memory format."""
        shape = list(self.data.shape)
        shape[1] = self.channels
        cl = self.data.dim() == 4 and not self.data.is_contiguous() and self.data.is_contiguous(
            memory_format=torch.channels_last)
        fmt = torch.channels_last if cl else torch.contiguous_format
        out = torch.empty(shape, dtype=self.data.dtype, device=self.data.device, memory_format=fmt).zero_()
        return out.index_copy_(1, self.idx, self.data)


def _dense(v):
    return v.dense() if isinstance(v, _Sparse) else v


@dataclass
class _Step:
    node: fx.Node
    kind: str                      # bn | mask | conv | linear | pass | call
    out: fx.Node                   # the env key the result is stored under (the fused ReLU for bn+relu)
    module: nn.Module | None = None
    unit: str | None = None        # bn: its module name; conv with row slicing: the consuming BN's name
    site: MaskSite | None = None   # mask: the site it applies
    hooks: list = field(default_factory=list)  # call: the MaskSites inside this leaf module
    relu: bool = False             # bn: ReLU fused
    sparse_out: bool = False       # bn: may emit a _Sparse value
    inplace_in: bool = False       # bn: its input is a fresh single-use tensor (safe to overwrite)
    free: list = field(default_factory=list)  # env keys whose last use is this step
    static_args: bool = False      # call: reads static (shared) tensors
    mutates: bool = False          # call: may modify an argument in place


@dataclass
class ChunkContext:
    """Per-call tensors the interpreter reads. scale/shift: {bn name: [Kc, C] float32} (mask and perturbation
    folded in); keep: {bn name: list of Kc ([C'] int64 surviving channels, or None = no skipping)};
    mask: {(module, site): [Kc, C] float32} for the sites that are not fused BNs."""

    scale: dict
    shift: dict
    keep: dict
    mask: dict = field(default_factory=dict)


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_function":
        return node.target in _RELU_FUNCS
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.ReLU)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_pass(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_function":
        return node.target in _PASS_FUNCS
    if node.op == "call_module":
        return isinstance(modules[node.target], _PASS_MODULES)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _mutates(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    if node.op == "call_function":
        return node.target in _INPLACE_FUNCS or bool(node.kwargs.get("inplace", False))
    return node.op == "call_method" and str(node.target).endswith("_")


class ModelPlan:
    """`model` traced once, masked at `sites`. Reads the model's parameters and buffers at run time (weight
    updates are seen). Raises UserError when the model cannot be traced or a site is not in its graph."""

    def __init__(self, model: nn.Module, sites: list[MaskSite]):
        self.model = model
        self.flops: int | None = None  # set to 0 to count the conv FLOPs the sliced path executes
        gm = trace(model)
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.bns: dict[str, nn.Module] = {}     # fused BN sites: name -> module
        self.mask_nodes: dict = {}               # inserted mask node -> MaskSite
        self.hooked: dict = {}                   # leaf node -> [MaskSite] inside it
        self._place_sites(sites)
        nodes = list(gm.graph.nodes)
        dyn: set = set()
        for n in nodes:
            site = (n in self.mask_nodes or n in self.hooked or (n.op == "call_module" and n.target in self.bns))
            if site or any(a in dyn for a in n.all_input_nodes):
                dyn.add(n)
        out_node = nodes[-1]
        if out_node.op != "output" or out_node not in dyn:
            raise UserError("no maskable neuron reaches the model output")
        if not isinstance(out_node.args[0], fx.Node):
            raise UserError("the model must return one logits tensor")
        self.output = out_node.args[0]
        self.static_nodes = [n for n in nodes if n not in dyn and n.op != "output"]
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        if len(self.placeholders) != 1:
            raise UserError("the model's forward must take exactly one input tensor")
        # static values that carry the batch dimension (derived from the input)
        batched: set = set()
        for n in self.static_nodes:
            if n.op == "placeholder" or any(a in batched for a in n.all_input_nodes):
                batched.add(n)
        self.batched_static = batched
        self.static_needed = {a for n in dyn for a in n.all_input_nodes if a not in dyn}
        self.steps = self._compile([n for n in nodes if n in dyn and n.op != "output"], dyn)

    # ---- compilation -------------------------------------------------------------------------------
    def _place_sites(self, sites: list[MaskSite]) -> None:
        """Fills bns / mask_nodes / hooked: each site becomes a fused BN, a mask node in the graph, or a hook
        on a submodule of a leaf node."""
        graph = self.gm.graph
        calls: dict = {}
        for n in list(graph.nodes):
            if n.op == "call_module":
                calls.setdefault(n.target, []).append(n)
        named = dict(self.model.named_modules())
        for site in sites:
            mod = named.get(site.module)
            if mod is None:
                raise UserError(f"mask site {site.module!r} is not a module of the model")
            if site.module in calls:
                if site.site == "out" and site.dim == 1 and isinstance(mod, _BN_TYPES):
                    self.bns[site.module] = self.modules[site.module]
                    continue
                for n in calls[site.module]:
                    if site.site == "out":
                        with graph.inserting_after(n):
                            m = graph.call_function(_mask_point, (n, site.key))
                        n.replace_all_uses_with(m, delete_user_cb=lambda u, m=m: u is not m)
                    else:
                        with graph.inserting_before(n):
                            m = graph.call_function(_mask_point, (n.args[0], site.key))
                        n.update_arg(0, m)
                    self.mask_nodes[m] = site
                continue
            leaves = [t for t in calls if site.module.startswith(t + ".")]
            if not leaves:
                raise UserError(f"mask site {site.module!r} is not reached by the traced graph")
            for n in calls[max(leaves, key=len)]:
                self.hooked.setdefault(n, []).append(site)

    def _compile(self, dyn_nodes: list, dyn: set) -> list:
        mods = self.modules
        fused: dict = {}
        for n in dyn_nodes:
            if n.op == "call_module" and n.target in self.bns:
                users = list(n.users)
                if len(users) == 1 and _is_relu(users[0], mods) and users[0].args[0] is n:
                    fused[n] = users[0]
        fused_relus = set(fused.values())

        def conv_ok(u):
            if u.op != "call_module":
                return False
            m = mods[u.target]
            return isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"

        def linear_ok(u):
            return u.op == "call_module" and isinstance(mods[u.target], nn.Linear)

        sparse_ok: dict = {}
        for n in reversed(dyn_nodes):  # can value n be handed on as _Sparse?
            ok = bool(n.users)
            for u in n.users:
                first = u.args[0] is n and sum(a is n for a in u.all_input_nodes) == 1 and not u.kwargs
                if not (first and (conv_ok(u) or linear_ok(u) or (_is_pass(u, mods) and sparse_ok.get(u, False)))):
                    ok = False
                    break
            sparse_ok[n] = ok

        steps, producer_kind = [], {}
        for n in dyn_nodes:
            if n in fused_relus:
                continue
            if n in self.mask_nodes:
                step = _Step(n, "mask", n, site=self.mask_nodes[n])
                producer_kind[n] = "fresh"
            elif n.op == "call_module" and n.target in self.bns:
                out = fused.get(n, n)
                src = n.args[0]
                fresh = producer_kind.get(src) in ("conv", "linear", "fresh") and len(src.users) == 1
                step = _Step(n, "bn", out, self.bns[n.target], unit=n.target, relu=n in fused,
                             sparse_out=sparse_ok[out], inplace_in=fresh)
                producer_kind[out] = "fresh"
            elif conv_ok(n):
                step = _Step(n, "conv", n, mods[n.target])
                users = list(n.users)
                if (len(users) == 1 and users[0].op == "call_module" and users[0].target in self.bns
                        and sparse_ok[fused.get(users[0], users[0])]):
                    step.unit = users[0].target  # compute only the rows that BN keeps
                producer_kind[n] = "conv"
            elif linear_ok(n):
                step = _Step(n, "linear", n, mods[n.target])
                producer_kind[n] = "linear"
            elif _is_pass(n, mods):
                step = _Step(n, "pass", n, mods.get(n.target) if n.op == "call_module" else None)
            else:
                step = _Step(n, "call", n, mods.get(n.target) if n.op == "call_module" else None,
                             static_args=any(a not in dyn for a in n.all_input_nodes),
                             mutates=_mutates(n, mods), hooks=self.hooked.get(n, []))
                if n.op == "call_function" and n.target in _FRESH_FUNCS:
                    producer_kind[n] = "fresh"
            steps.append(step)
        # last uses: free dynamic values after the step that reads them last
        last: dict = {}
        for i, s in enumerate(steps):
            for a in s.node.all_input_nodes:
                if a in dyn:
                    last[a] = i
        last[self.output] = len(steps)
        for key, i in last.items():
            if i < len(steps):
                steps[i].free.append(key)
        return steps

    # ---- execution ---------------------------------------------------------------------------------
    def run_static(self, images: torch.Tensor) -> dict:
        """Runs the unmasked prefix once on images [B, ...]; returns {node: value} of the values the dynamic
        part reads."""
        env: dict = {}
        for n in self.static_nodes:
            if n.op == "placeholder":
                env[n] = images
                continue
            env[n] = self._call(n, env)
        return {n: env[n] for n in self.static_needed}

    def _call(self, n: fx.Node, env: dict, fetch=None):
        fetch = fetch or (lambda a: env[a])
        args = fx.node.map_arg(n.args, fetch)
        kwargs = fx.node.map_arg(n.kwargs, fetch)
        if n.op == "call_module":
            return self.modules[n.target](*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        if n.op == "get_attr":
            obj = self.gm
            for part in n.target.split("."):
                obj = getattr(obj, part)
            return obj
        raise UserError(f"unsupported graph node {n.op} {n.target}")

    def run_sliced(self, static: dict, ctx: ChunkContext, k: int) -> torch.Tensor:
        """Mask k of the chunk, skipping zeroed channels. static: from run_static. Returns logits [B, classes]."""
        env = dict(static)
        for s in self.steps:
            n = s.node
            if s.kind == "bn":
                env[s.out] = self._bn_sliced(s, env[n.args[0]], ctx, k)
            elif s.kind == "mask":
                x = _dense(env[n.args[0]]).unsqueeze(0)
                env[n] = _mask_values(x, ctx.mask[s.site.key][k:k + 1], s.site.dim)[0]
            elif s.kind == "conv":
                env[n] = self._conv_sliced(s, env[n.args[0]], ctx, k)
            elif s.kind == "linear" and isinstance(env[n.args[0]], _Sparse) and env[n.args[0]].data.dim() == 2:
                v = env[n.args[0]]
                m = s.module
                env[n] = F.linear(v.data, m.weight.index_select(1, v.idx), m.bias)
            elif s.kind == "pass" and isinstance(env[n.args[0]], _Sparse):
                v = env[n.args[0]]
                env[n] = _Sparse(self._call(n, env, lambda a: v.data if a is n.args[0] else env[a]), v.idx,
                                 v.channels)
            else:
                with self._site_hooks(s.hooks, ctx, slice(k, k + 1)):
                    env[n] = self._call(n, env, self._fetch_dense(s, env, static))
            for key in s.free:
                env.pop(key, None)
        return _dense(env[self.output])

    @contextlib.contextmanager
    def _site_hooks(self, sites: list, ctx: ChunkContext, rows: slice):
        """Within the block, the submodules of `sites` multiply their output ("out") or first input ("in") by
        ctx.mask[site][rows] ([Kc', C]); their activations carry Kc' masks folded into the batch dim."""
        if not sites:
            yield
            return
        named = dict(self.model.named_modules())
        handles = []
        for site in sites:
            m = ctx.mask[site.key][rows]

            def scale(t, m=m, dim=site.dim):
                return _mask_values(t.unflatten(0, (m.shape[0], -1)), m, dim).flatten(0, 1)

            if site.site == "out":
                handles.append(named[site.module].register_forward_hook(lambda mod, inp, out, f=scale: f(out)))
            else:
                handles.append(named[site.module].register_forward_pre_hook(
                    lambda mod, inp, f=scale: (f(inp[0]),) + tuple(inp[1:])))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _fetch_dense(self, s: _Step, env: dict, static: dict):
        def fetch(a):
            v = _dense(env[a])
            if s.mutates and a in static and isinstance(v, torch.Tensor):
                v = v.clone()
            return v
        return fetch

    def _bn_sliced(self, s: _Step, v, ctx: ChunkContext, k: int):
        scale, shift = ctx.scale[s.unit][k], ctx.shift[s.unit][k]
        if isinstance(v, _Sparse):  # rows computed by a row-sliced conv: idx is this BN's keep set
            bn_mask_relu_(v.data.unsqueeze(0), scale[v.idx].unsqueeze(0), shift[v.idx].unsqueeze(0), s.relu)
            return v
        keep = ctx.keep[s.unit][k]
        if s.sparse_out and keep is not None:
            out = bn_mask_relu(v.unsqueeze(0), scale.unsqueeze(0), shift.unsqueeze(0), keep.unsqueeze(0), s.relu)
            return _Sparse(out[0], keep, v.shape[1])
        if s.inplace_in:
            bn_mask_relu_(v.unsqueeze(0), scale.unsqueeze(0), shift.unsqueeze(0), s.relu)
            return v
        return bn_mask_relu(v.unsqueeze(0), scale.unsqueeze(0), shift.unsqueeze(0), None, s.relu)[0]

    def _conv_sliced(self, s: _Step, v, ctx: ChunkContext, k: int):
        m = s.module
        w, b = m.weight, m.bias
        if isinstance(v, _Sparse):
            w = w.index_select(1, v.idx)
            v = v.data
        rows = ctx.keep[s.unit][k] if s.unit is not None else None
        if rows is not None:
            w = w.index_select(0, rows)
            b = b.index_select(0, rows) if b is not None else None
        out = F.conv2d(v, w, b, m.stride, m.padding, m.dilation, 1)
        if self.flops is not None:
            self.flops += 2 * out.numel() * w[0].numel()
        return _Sparse(out, rows, m.out_channels) if rows is not None else out

    def run_batched(self, static: dict, ctx: ChunkContext, kc: int) -> torch.Tensor:
        """A chunk of kc masks folded into the batch (values [kc*B, ...]). Returns logits [kc, B, classes]."""
        env = dict(static)
        repeated: dict = {}

        def fetch(a):
            v = env[a]
            if a in static and a in self.batched_static and isinstance(v, torch.Tensor):
                if a not in repeated:
                    repeated[a] = v.repeat(kc, *([1] * (v.dim() - 1)))
                return repeated[a]
            return v

        for s in self.steps:
            n = s.node
            if s.kind == "bn":
                v = env[n.args[0]]
                scale, shift = ctx.scale[s.unit], ctx.shift[s.unit]
                if n.args[0] in static:  # shared prefix value: Kx = 1, broadcast to the chunk
                    out = bn_mask_relu(v.unsqueeze(0), scale, shift, None, s.relu)
                    env[s.out] = out.flatten(0, 1)
                else:
                    x = v.unflatten(0, (kc, -1))
                    if s.inplace_in:
                        bn_mask_relu_(x, scale, shift, s.relu)
                        env[s.out] = v
                    else:
                        env[s.out] = bn_mask_relu(x, scale, shift, None, s.relu).flatten(0, 1)
            elif s.kind == "mask":
                v = env[n.args[0]]
                x = v.unsqueeze(0) if n.args[0] in static else v.unflatten(0, (kc, -1))
                env[n] = _mask_values(x, ctx.mask[s.site.key], s.site.dim).flatten(0, 1)
            else:
                with self._site_hooks(s.hooks, ctx, slice(None)):
                    env[n] = self._call(n, env, fetch)
            for key in s.free:
                env.pop(key, None)
                repeated.pop(key, None)
        return env[self.output].unflatten(0, (kc, -1))

    # ---- memory estimate ---------------------------------------------------------------------------
    def activation_bytes(self, sample: torch.Tensor) -> tuple[int, int]:
        """(shared, per_mask) bytes for ONE image sample [1, ...]: the static values the dynamic part reads, and
        per mask 1.5 x the peak of live dynamic values + 2 x the largest activation (oneDNN reorder buffers,
        allocator slack; calibrated against measured peak RSS) + the static values a batched run repeats.
        An upper bound for the sliced path, which keeps fewer channels. Multiply by B."""
        sizes: dict = {}
        interp = fx.Interpreter(self.gm)
        orig = interp.run_node

        def run_node(n):
            val = orig(n)
            if isinstance(val, torch.Tensor):
                sizes[n] = val.numel() * val.element_size()
            return val

        interp.run_node = run_node
        with torch.no_grad():
            interp.run(sample)
        shared = sum(sizes.get(n, 0) for n in self.static_needed)
        live, peak, largest = 0, 0, 0
        alive = {}
        for i, s in enumerate(self.steps):
            size = sizes.get(s.out, 0)
            alive[s.out] = size
            live += size
            peak = max(peak, live)
            largest = max(largest, size)
            for key in s.free:
                live -= alive.pop(key, 0)
        # batched runs repeat the static values the dynamic part reads (e.g. an identity shortcut)
        repeated = sum(sizes.get(n, 0) for n in self.static_needed if n in self.batched_static)
        per_mask = int(1.5 * peak) + 2 * largest + repeated
        return shared, per_mask
