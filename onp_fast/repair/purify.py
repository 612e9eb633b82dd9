"""Purification after the depth rule (onp.md section 6b): fine-tuning that moves the pruned model's weights away
from the backdoor instead of only masking it, on D_opt only, pruned groups held at zero, guarded by the held-out
CA on D_val."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..prepare import DefenseContext, accuracy_of, finetune_pruned


def purify(ctx: DefenseContext, model: nn.Module, prune: torch.Tensor, ca_val_before: float) -> dict:
    """Purifies the pruned `model` in place (prune [G] bool) with `ctx.cfg.purify`:
    - "sam": sharpness-aware fine-tuning (FT-SAM's adaptive step, radius `sam_rho`) on D_opt;
    - "proxy": D_opt plus its non-proxy-class images stamped with the flagged trigger proxy, with their true labels
      (unlearning the proxy trigger), plain SGD;
    - "sam+proxy": both. Without a flagged proxy, "proxy" and "sam+proxy" run trigger-free SAM, so an unflagged
      backdoor is not left untouched.
    `purify_epochs` epochs at `purify_lr`. If CA on D_val ends below ca_val_before - tolerance, the model is put
    back as it was (report "kept": False). -> the report part."""
    cfg = ctx.cfg
    mode = cfg.purify
    x, y = ctx.x_opt, ctx.y_opt
    stamped = 0
    if "proxy" in mode and ctx.trigger is not None:
        other = y != ctx.trigger.target
        x, y = torch.cat([x, ctx.trigger.apply(x[other])]), torch.cat([y, y[other]])
        stamped = int(other.sum())
    sam = "sam" in mode or stamped == 0
    saved = copy.deepcopy(model.state_dict())
    finetune_pruned(model, ctx.groups, prune, x, y, epochs=cfg.purify_epochs, lr=cfg.purify_lr, seed=cfg.seed,
                    rho=cfg.sam_rho if sam else 0.0)
    ca_after = accuracy_of(model, ctx.x_val, ctx.y_val)
    kept = ca_after >= ca_val_before - cfg.tolerance - 1e-12
    if not kept:
        model.load_state_dict(saved)
    return {"mode": mode, "sam_rho": cfg.sam_rho if sam else 0.0, "proxy_images": stamped, "images": len(x),
            "epochs": cfg.purify_epochs, "lr": cfg.purify_lr, "ca_val_after": ca_after, "kept": kept}
