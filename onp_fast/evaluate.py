"""Evaluate a model on a data set: CA on the clean test split; with an attack, ASR and RA on the triggered
non-target test images (see onp_fast.metrics).

Attack spec files (`model.attack.json`, written by `onp-fast attack`) hold {"attack": <Attack.spec()>,
"target": int, "poison_rate", "seed", "dataset", "split", ...}; a bare `Attack.spec()` object is accepted
too, with the target given separately.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import attacks, metrics
from .errors import UserError
from .train import predict

SPEC_FORMAT = "onp-fast-attack/1"


@dataclass
class AttackSpec:
    """A rebuilt attack, its target class, and everything else the spec file held (`meta`)."""

    attack: attacks.Attack
    target: int | None
    meta: dict


def attack_spec_path(model_path: str | os.PathLike) -> Path:
    """model.pt -> model.attack.json beside it."""
    p = Path(model_path)
    return p.with_name(p.stem + ".attack.json")


def load_attack_spec(path: str | os.PathLike) -> AttackSpec:
    """Reads an attack spec JSON file; UserError (one line) when missing, not JSON, or malformed."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"attack spec file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"attack spec {p} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"attack spec {p} must hold a JSON object")
    spec = data.get("attack", data)
    target = data.get("target")
    if target is not None and (isinstance(target, bool) or not isinstance(target, int)):
        raise UserError(f"attack spec {p}: 'target' must be an integer, got {target!r}")
    return AttackSpec(attack=attacks.from_spec(spec), target=target, meta=data)


def predict_classes(model: torch.nn.Module, x: torch.Tensor, mean, std, batch_size: int = 512,
                    max_memory: int | str | None = None) -> torch.Tensor:
    """x: [N, C, H, W] float32 pixels in [0, 1] -> [N] int64 top-1 classes on the CPU (model in eval mode, on its
    device), in batches of at most `batch_size` images, fewer where `max_memory` (bytes or "512MB"; None: no
    budget) cannot hold them (train.predict)."""
    return predict(model, x, mean, std, batch_size, max_memory).argmax(1)


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mean, std, *,
             attack: attacks.Attack | None = None, target: int | None = None,
             batch_size: int = 512, max_memory: int | str | None = None) -> dict:
    """x: [N, C, H, W] float32 clean test pixels, y: [N] int64 (CPU; the model runs on its own device) ->
    {"ca", "n_test"} and, with an attack, {"asr", "ra", "n_triggered"} (target-class images left out of the
    triggered set). Batches as `predict_classes`'s: the numbers do not depend on the budget."""
    result = {"ca": metrics.clean_accuracy(predict_classes(model, x, mean, std, batch_size, max_memory), y),
              "n_test": int(y.numel())}
    if attack is not None:
        if target is None:
            raise UserError("evaluating an attack needs its target class")
        if tuple(x.shape[1:]) != attack.image_shape:
            raise UserError(f"the attack spec is for images {list(attack.image_shape)}, "
                            f"the data set has {list(x.shape[1:])}")
        keep = metrics.non_target_mask(y, target)
        xt, yt = x[keep], y[keep]
        pred = predict_classes(model, attack.apply(xt), mean, std, batch_size, max_memory)
        result.update(asr=metrics.attack_success_rate(pred, yt, target),
                      ra=metrics.robust_accuracy(pred, yt, target), n_triggered=int(yt.numel()))
    return result
