"""Backdoor metrics, BackdoorBench conventions (see design/evaluation.md). All results are fractions in [0, 1].

- CA: top-1 accuracy on the clean test set.
- ASR: fraction of triggered test images predicted as the target; images whose true class is the target
  are left out.
- RA: accuracy of the same triggered (non-target) images against their original labels.
- DER = [max(0, ASR_before - ASR_after) - max(0, CA_before - CA_after) + 1] / 2.
"""
from __future__ import annotations

import torch

from .errors import UserError


def _check(pred: torch.Tensor, labels: torch.Tensor) -> None:
    if pred.shape != labels.shape or pred.dim() != 1:
        raise UserError(f"predictions {list(pred.shape)} and labels {list(labels.shape)} must be equal 1-D")


def clean_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """pred, labels: [N] int64 predicted / true classes of clean images -> CA."""
    _check(pred, labels)
    if labels.numel() == 0:
        raise UserError("clean accuracy of an empty test set")
    return (pred == labels).double().mean().item()


def non_target_mask(labels: torch.Tensor, target: int) -> torch.Tensor:
    """labels: [N] int64 true classes -> [N] bool, True where the image counts for ASR and RA."""
    return labels != int(target)


def attack_success_rate(pred: torch.Tensor, labels: torch.Tensor, target: int) -> float:
    """pred: [N] int64 predictions on triggered images, labels: [N] int64 their true classes -> ASR.

    Target-class images are left out.
    """
    _check(pred, labels)
    keep = non_target_mask(labels, target)
    if not bool(keep.any()):
        raise UserError(f"no test image outside the target class {target}: ASR undefined")
    return (pred[keep] == int(target)).double().mean().item()


def robust_accuracy(pred: torch.Tensor, labels: torch.Tensor, target: int) -> float:
    """pred: [N] int64 predictions on triggered images, labels: [N] int64 their true classes -> RA.

    Target-class images are left out, as for ASR.
    """
    _check(pred, labels)
    keep = non_target_mask(labels, target)
    if not bool(keep.any()):
        raise UserError(f"no test image outside the target class {target}: RA undefined")
    return (pred[keep] == labels[keep]).double().mean().item()


def defense_effectiveness_rating(asr_before: float, asr_after: float, ca_before: float, ca_after: float) -> float:
    """DER from fractions: 1 = ASR 1 -> 0 at no CA cost, 0.5 = no change, 0 = CA 1 -> 0 with no ASR drop."""
    for name, v in (("asr_before", asr_before), ("asr_after", asr_after),
                    ("ca_before", ca_before), ("ca_after", ca_after)):
        if not 0.0 <= float(v) <= 1.0:
            raise UserError(f"DER takes fractions in [0, 1]; {name} = {v}")
    return (max(0.0, asr_before - asr_after) - max(0.0, ca_before - ca_after) + 1.0) / 2.0


ACCURACY_SLACK = 1e-6  # under the 1/N step of any accuracy on N < 10^6 images, over float32 rounding (~6e-8)


def within_tolerance(ca: float, ca_before: float, tolerance: float) -> bool:
    """Whether accuracy `ca` is at most `tolerance` under `ca_before` (a drop of exactly `tolerance` allowed).
    Either accuracy may come from a float32 count ratio (0.91 is 0.9100000262 there, 0.89 is 0.8899999857), so
    the comparison gives ACCURACY_SLACK of room, less than one image of any defense or test set."""
    return ca >= ca_before - tolerance - ACCURACY_SLACK
