"""Bench cases of the masked-forward reward engine.

Grid: preactresnet18, 32x32, B = 64, K in {4, 16, 64}, width in {0.25, 1.0} (--quick: width 0.25,
K = 4). Per point: `loop` (the per-mask loop with BN forward hooks, the model as given: the baseline),
`op` (RewardEngine, default strategy) and `naive_kxb` (images repeated K times, hooks multiply by the mask;
chunked at 16 masks to bound memory), each with its ratio to the loop.

Mask density: Bernoulli masks with prune probability 0.5, what a product-of-Bernoulli policy with a
zero-initialised prune head samples at the first RL iteration; `op_p0.1` repeats the op at prune probability
0.1 (a late-iteration / final-mask density), where channel skipping saves far less (a layer keeping more
than 80% of its channels after padding runs dense, fused, without weight slicing). The loop's cost does not
depend on the mask. Ceiling rows: one unmasked channels-last forward of the same batch (`unmasked_cl_forward`)
beside the NCHW one. Every entry's `note` (JSON) holds its GFLOP/s: executed FLOPs (the op skips the
channels a mask zeroes) and dense-equivalent FLOPs (K unmasked forwards), next to the ceiling's.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..models import build
from ..reward.reference import loop_reference, naive_batch_reference
from ..reward import RewardEngine, bn_neurons
from . import Case

PRUNE_P = 0.5
PRUNE_P_LOW = 0.1
NAIVE_CHUNK = 16


def forward_flops(model: nn.Module, images: torch.Tensor) -> int:
    """FLOPs (2 x multiply-adds) of the Conv2d and Linear layers in one forward of images [B, ...]."""
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            total[0] += 2 * out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            total[0] += 2 * out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def bernoulli_masks(k: int, n: int, prune_p: float, seed: int = 0) -> torch.Tensor:
    """[k, n] float32 0/1 masks, each neuron pruned with probability prune_p."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(k, n, generator=g) >= prune_p).float()


class _Timed:
    """Wraps a case fn; after each call writes GFLOP/s (from the fastest call so far) into info['note'].
    flops: a number, or a callable giving the FLOPs the last call executed."""

    def __init__(self, fn, info: dict, flops, dense_flops: float | None = None):
        self.fn, self.info, self.flops, self.dense = fn, info, flops, dense_flops
        self.best = float("inf")

    def __call__(self):
        import time
        t0 = time.perf_counter()
        out = self.fn()
        self.best = min(self.best, time.perf_counter() - t0)
        flops = self.flops() if callable(self.flops) else self.flops
        note = f"{flops / self.best / 1e9:.1f} GFLOP/s executed"
        if self.dense is not None:
            note += f", {self.dense / self.best / 1e9:.1f} dense-equivalent"
        self.info["note"] = note
        self.info["gflop_executed"] = flops / 1e9
        return out


def cases(quick: bool) -> list[Case]:
    widths = [0.25] if quick else [0.25, 1.0]
    ks = [4] if quick else [4, 16, 64]
    return [case for width in widths for case in _width_cases(width, ks, quick)]


def _width_cases(width: float, ks: list[int], quick: bool, B: int = 64) -> list[Case]:
    """The cases of one width (a function scope, so every closure binds this width's model and data)."""
    out: list[Case] = []
    torch.manual_seed(0)
    model = build("preactresnet18", width=width, input_size=32).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, 32, 32, generator=g)
    labels = torch.randint(0, 10, (B,), generator=g)
    n = bn_neurons(model).size
    fwd = forward_flops(model, images)
    repeats = 2 if quick else (3 if width < 1 else 1)
    cl_model = build("preactresnet18", width=width, input_size=32).eval().to(memory_format=torch.channels_last)
    cl_model.load_state_dict(model.state_dict())
    cl_images = images.contiguous(memory_format=torch.channels_last)
    ceil_name = f"reward ceiling preactresnet18 w={width} B={B}"
    for impl, mdl, x, base in [("unmasked_nchw_forward", model, images, None),
                               ("unmasked_cl_forward", cl_model, cl_images, "unmasked_nchw_forward")]:
        info = {"width": width, "B": B, "gflop": fwd / 1e9}
        out.append(Case(ceil_name, impl, _Timed(lambda m=mdl, x=x: _no_grad(m, x), info, fwd),
                        baseline=base, repeats=max(repeats, 3), info=info))
    engine = RewardEngine(model)
    counter = _FlopCounter(engine, images, labels, fwd)
    for k in ks:
        name = f"reward preactresnet18 w={width} B={B} K={k}"
        dense = k * fwd
        masks = bernoulli_masks(k, n, PRUNE_P, seed=k)
        info = {"width": width, "B": B, "K": k, "prune_p": PRUNE_P}
        out.append(Case(name, "loop", _Timed(lambda m=masks: loop_reference(model, m, images, labels), info,
                                             dense, dense), repeats=repeats, info=info))
        for impl, prune_p in [("op", PRUNE_P), ("op_p0.1", PRUNE_P_LOW)]:
            m_k = bernoulli_masks(k, n, prune_p, seed=k)
            info = {"width": width, "B": B, "K": k, "prune_p": prune_p, "strategy": engine.strategy}
            out.append(Case(name, impl, _Timed(lambda m=m_k: counter.score(m), info, counter.executed, dense),
                            baseline="loop", repeats=repeats, info=info))
        info = {"width": width, "B": B, "K": k, "prune_p": PRUNE_P, "chunk": NAIVE_CHUNK}
        out.append(Case(name, "naive_kxb", _Timed(
            lambda m=masks: naive_batch_reference(model, m, images, labels, chunk=NAIVE_CHUNK), info, dense,
            dense), baseline="loop", repeats=repeats, info=info))
    return out


class _FlopCounter:
    """Runs engine.score and counts the conv FLOPs it executes: the sliced dynamic convs (counted by the plan)
    plus the rest of one forward (prefix conv, linear) once; K dense forwards for the batched strategy."""

    def __init__(self, engine: RewardEngine, images, labels, fwd: int):
        self.engine, self.images, self.labels, self.fwd = engine, images, labels, fwd
        self.plan = engine.plans[0]
        self.plan.flops = 0
        engine.score(torch.ones(1, engine.num_neurons), images[:1], labels[:1])
        self.rest = fwd - self.plan.flops * images.shape[0]  # prefix and linear: not per mask
        self.plan.flops = None
        self.last = 0.0

    def score(self, masks):
        sliced = self.engine.strategy == "sliced"
        self.plan.flops = 0 if sliced else None
        out = self.engine.score(masks, self.images, self.labels)
        self.last = (self.plan.flops + self.rest) if sliced else masks.shape[0] * self.fwd
        self.plan.flops = None
        return out

    def executed(self) -> float:
        return float(self.last)


def _no_grad(model, x):
    with torch.no_grad():
        return model(x)
