"""Thin wrappers of the masked-forward reward ops (torch.ops.onp_fast.bn_mask_relu[_], reward_epilogue).

The C++ (CPU) and CUDA kernels do the work; argument checks live in C++ (RuntimeError naming the problem).
Fake (meta) implementations are registered here so the ops trace under torch.compile / opcheck.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .._ext import load

load()


def _channels_last(x: torch.Tensor) -> bool:
    """True when each x[k] ([B, C, *S]) is laid out channels-last (the C++ rule)."""
    spatial = 1
    for s in x.shape[3:]:
        spatial *= s
    return x.dim() >= 4 and x.shape[2] > 1 and x.stride(2) == 1 and spatial > 1


def _out_like(x: torch.Tensor, k: int, cout: int) -> torch.Tensor:
    """Empty [K, B, C', *S] of x's dtype and device, in x's per-mask layout (bn_mask_empty_out in C++)."""
    spatial = list(x.shape[3:])
    if _channels_last(x):
        return x.new_empty([k, x.shape[1], *spatial, cout]).movedim(-1, 2)
    return x.new_empty([k, x.shape[1], cout, *spatial])


@torch.library.register_fake("onp_fast::bn_mask_relu")
def _bn_mask_relu_fake(x, scale, shift, index, relu):
    cout = x.shape[2] if index is None else index.shape[1]
    return _out_like(x, scale.shape[0], cout)


@torch.library.register_fake("onp_fast::bn_mask_relu_")
def _bn_mask_relu_inplace_fake(x, scale, shift, relu):
    return None


@torch.library.register_fake("onp_fast::reward_epilogue")
def _reward_epilogue_fake(logits, labels):
    k, _, c = logits.shape
    return (labels.new_empty([k]), logits.new_empty([k], dtype=torch.float64), labels.new_empty([k, c]),
            logits.new_empty([k], dtype=torch.float64))


def bn_mask_relu(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, index: torch.Tensor | None = None,
                 relu: bool = True) -> torch.Tensor:
    """Fused eval-BN + mask (+ ReLU) for K masks, gathering the surviving channels.

    x:     [Kx, B, C, *S] float32, bfloat16 or float16, Kx in {1, K} (1: one input shared by all masks, e.g. the
           unmasked prefix); each x[k] contiguous or channels-last (the output keeps that layout).
    scale: [K, C] float32, m * gamma' / sqrt(var + eps) (m the mask, gamma' the perturbed BN weight).
    shift: [K, C] float32, m * (beta' - mean * gamma' / sqrt(var + eps)).
    index: [K, C'] int64 or None; output channel j of mask k is input channel index[k, j] (-1: all zero).
    Returns [K, B, C', *S] of x's dtype: act(x[k, :, index[k, j]] * scale[k, c] + shift[k, c]), act = ReLU or
    identity, computed in float32 and rounded once to x's dtype (bfloat16 x, e.g. under torch.autocast, stays bf16).
    """
    return torch.ops.onp_fast.bn_mask_relu(x, scale, shift, index, relu)


def bn_mask_relu_(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """In-place bn_mask_relu without channel gathering. x: [K, B, C, *S] float32, bfloat16 or float16, dense per
    mask (contiguous or channels-last); scale/shift [K, C] float32 (math in float32, one rounding to x's dtype).
    Returns x."""
    torch.ops.onp_fast.bn_mask_relu_(x, scale, shift, relu)
    return x


class EpilogueOut(NamedTuple):
    """correct [K] int64; ce_sum [K] float64 (summed cross-entropy); counts [K, num_classes] int64 (argmax);
    prob_sum [K] float64 (summed softmax probability of the label)."""

    correct: torch.Tensor
    ce_sum: torch.Tensor
    counts: torch.Tensor
    prob_sum: torch.Tensor


def reward_epilogue(logits: torch.Tensor, labels: torch.Tensor) -> EpilogueOut:
    """Per-mask reduction of logits [K, B, num_classes] (float) against labels [B] int64: number correct
    (argmax, first index on ties), summed cross-entropy (in float64), argmax counts per class, and the summed
    softmax probability of the label (in float64)."""
    return EpilogueOut(*torch.ops.onp_fast.reward_epilogue(logits, labels))
