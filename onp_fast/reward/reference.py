"""Pure-PyTorch references of the reward engine (the ops' own references are in onp_fast.ops.reference).

- loop_reference: the per-mask loop, one eval forward per (model, setting, mask) with forward hooks on the BN
  modules multiplying their output by the mask (how ANP/RNP-style code evaluates masks).
- naive_batch_reference: the naive K*B batch, images repeated K times, hooks multiply by a [K*B, C, 1, ...] mask.
Both return a RewardResult shaped like RewardEngine.score's.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.reference import reward_epilogue_reference
from .neurons import NeuronSet, bn_neurons
from .result import Perturbations, RewardResult


@contextmanager
def _bn_hooks(model: nn.Module, neurons: NeuronSet, mask: torch.Tensor, factors=None, repeat: int = 1):
    """Forward hooks on the masked BN modules. mask [R, N] (R = 1, or R = K with repeat = B for the naive
    batch); factors: optional ([N] gamma factor, [N] beta factor) perturbation; the BN output becomes
    batch_norm(x; gamma * fg, beta * fb) * m."""
    named = dict(model.named_modules())
    channels = {name: named[name].num_features for name in neurons.modules()}
    masks = neurons.module_masks(mask, channels)                              # {name: [R, C]}
    if factors is not None:
        fgs = neurons.module_masks(factors[0][None], channels)
        fbs = neurons.module_masks(factors[1][None], channels)
    handles = []
    for name in neurons.modules():
        bn = named[name]
        m = masks[name].repeat_interleave(repeat, 0) if repeat > 1 else masks[name]
        pert = None if factors is None else (fgs[name][0], fbs[name][0])

        def hook(mod, inp, out, m=m, pert=pert):
            if pert is not None:
                w = mod.weight if mod.weight is not None else torch.ones_like(mod.running_mean)
                b = mod.bias if mod.bias is not None else torch.zeros_like(mod.running_mean)
                out = F.batch_norm(inp[0], mod.running_mean, mod.running_var, w * pert[0], b * pert[1], False,
                                   0.0, mod.eps)
            return out * m.view(m.shape[0], m.shape[1], *([1] * (out.dim() - 2)))

        handles.append(bn.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _settings(perturbations: Perturbations | None):
    out = [None]
    if perturbations is not None:
        out += [(1 + perturbations.d_gamma[p], 1 + perturbations.d_beta[p]) for p in range(perturbations.count)]
    return out


def _score(models, neurons, masks, images, labels, perturbations, return_logits, forward):
    models = [models] if isinstance(models, nn.Module) else list(models)
    neurons = neurons or bn_neurons(models[0])
    S, K = len(_settings(perturbations)), masks.shape[0]
    results = []
    for model in models:
        flags = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                results.append([forward(model, neurons, factors) for factors in _settings(perturbations)])
        finally:
            for m, f in flags:
                m.training = f
    logits = torch.stack([torch.stack(r) for r in results])                   # [M, S, K, B, classes]
    M, classes = logits.shape[0], logits.shape[-1]
    flat = logits.reshape(M * S * K, -1, classes)
    correct, ce, counts, prob = reward_epilogue_reference(flat, labels)
    return RewardResult(correct.view(M, S, K), ce.view(M, S, K), counts.view(M, S, K, classes),
                        logits if return_logits else None, prob.view(M, S, K))


def loop_reference(models: nn.Module | Sequence[nn.Module], masks: torch.Tensor, images: torch.Tensor,
                   labels: torch.Tensor, perturbations: Perturbations | None = None,
                   neurons: NeuronSet | None = None, return_logits: bool = False) -> RewardResult:
    """The per-mask loop. masks [K, N] float, images [B, ...] normalised float32, labels [B] int64."""
    def forward(model, neurons, factors):
        out = []
        for k in range(masks.shape[0]):
            with _bn_hooks(model, neurons, masks[k:k + 1], factors):
                out.append(model(images))
        return torch.stack(out)
    return _score(models, neurons, masks, images, labels, perturbations, return_logits, forward)


def naive_batch_reference(models: nn.Module | Sequence[nn.Module], masks: torch.Tensor, images: torch.Tensor,
                          labels: torch.Tensor, perturbations: Perturbations | None = None,
                          neurons: NeuronSet | None = None, return_logits: bool = False,
                          chunk: int | None = None) -> RewardResult:
    """The naive K*B batch (chunk masks at a time, default all K): images repeated, hooks multiply by the mask."""
    B = images.shape[0]

    def forward(model, neurons, factors):
        out = []
        step = chunk or masks.shape[0]
        for k0 in range(0, masks.shape[0], step):
            mk = masks[k0:k0 + step]
            with _bn_hooks(model, neurons, mk, factors, repeat=B):
                out.append(model(images.repeat(mk.shape[0], *([1] * (images.dim() - 1)))).view(mk.shape[0], B, -1))
        return torch.cat(out)
    return _score(models, neurons, masks, images, labels, perturbations, return_logits, forward)
