"""Purification after the depth rule (onp.md section 6b): fine-tuning that moves the pruned model's weights away
from the backdoor instead of only masking it, on D_opt only, pruned groups held at zero, guarded by the held-out
CA on D_val."""
from __future__ import annotations

import copy
from dataclasses import replace

import torch
import torch.nn as nn

from ..metrics import within_tolerance
from ..prepare import PURIFY_EPOCHS, DefenseContext, ProxySet, accuracy_of, finetune_pruned
from ..prepare.trigger import resolve_setting, tile_proxies
from ..torchutil import autocast, full_precision

DISTILL_TEMPERATURE = 2.0
REFIT_LAM = 30.0  # a refit's penalty on the mean mask value, 3 x the trigger phase's (measurements: docs/design.md,
# "Refitting the tile proxies")


def purify(ctx: DefenseContext, model: nn.Module, prune: torch.Tensor, ca_val_before: float, mode: str) -> dict:
    """Purifies the pruned `model` in place (prune [G] bool) with `mode`:
    - "sam": sharpness-aware fine-tuning (FT-SAM's adaptive step, radius `sam_rho`) on D_opt;
    - "proxy": proxy unlearning: every batch of D_opt also carries a copy of each image stamped with a trigger
      proxy of another class, with its true label. The (family, class) of each copy is drawn with probability
      softmax(anomaly index) (ProxySet.sample), so a flagged class gets most copies and an unflagged backdoor's
      class still gets its share; with `purify_every_family`, one copy per family instead, its class drawn with
      softmax(anomaly index) within the family (a family's share does not shrink as families are added); plain
      SGD; when the set has tile proxies (a tiled model, `ProxySet.tile_masks`), they replace that draw: each
      image gets one copy stamped with one of them, drawn uniformly (why: docs/design.md, "Tile proxies for a
      ViT"), and the epochs are cut into `purify_rounds` rounds (at most one per epoch): before each round after
      the first, the tile proxies are fitted again on the model as it is then, from where they stand
      (`_refit`; why: docs/design.md, "Refitting the tile proxies");
    - "sam+proxy": both.
    Without proxies (none synthesised), "proxy" and "sam+proxy" run trigger-free SAM, so the backdoor is not left
    untouched. The defense images' own loss is distillation from the model as given (`purify_distill`), with a
    share `purify_hard` of their labels' cross-entropy mixed in, and, when `purify_labels_where_wrong`, their
    labels alone on the images that model misclassifies. `purify_epochs` epochs (None: PURIFY_EPOCHS) at `purify_lr`
    (annealed to 0 by a cosine over the steps when `purify_cosine`), each step's gradient clipped to norm
    `purify_clip` (0: not clipped), path-aware when `purify_path` is not 0 (finetune_pruned's `path`). After each
    epoch CA on D_val is measured; the model kept is the one after the last epoch whose CA stays at or above
    ca_val_before - tolerance ("kept_epochs"; 0 and "kept": False when none does: the model is put back as it
    was). The steps run at `precision` (`torchutil.autocast`), the held-out check at float32. A bar of its steps
    on stderr when ctx.progress. -> the report part."""
    cfg = ctx.cfg
    epochs = PURIFY_EPOCHS if cfg.purify_epochs is None else cfg.purify_epochs
    clip = cfg.purify_clip or None
    proxies = ctx.proxies if "proxy" in mode else None
    augment = None
    tiles = proxies is not None and proxies.tile_masks is not None
    ends = {epochs * r // cfg.purify_rounds for r in range(1, min(cfg.purify_rounds, epochs))} if tiles else set()
    current = proxies  # the set the copies are stamped from; a refit replaces it (ctx.proxies stays as it is)
    refits = []
    if proxies is not None:
        def augment(xb, yb, gen):
            if tiles:
                copies = [current.stamp_tiles(xb, gen)]
            else:
                draws = ([proxies.sample(yb, gen, family=f) for f in range(len(proxies.patterns))]
                         if cfg.purify_every_family else [proxies.sample(yb, gen)])
                copies = [proxies.stamp(xb, family, cls) for family, cls in draws]
            return torch.cat([xb, *copies]), yb.repeat(1 + len(copies))
    sam = "sam" in mode or proxies is None
    best = {"epoch": 0, "state": copy.deepcopy(model.state_dict()), "ca": None}  # one copy, overwritten in place
    curve = []

    def check(epoch):  # the last epoch whose held-out CA stays within the tolerance is what purification keeps
        nonlocal current
        with full_precision(ctx.x_val.device):
            ca = accuracy_of(model, ctx.x_val, ctx.y_val, max_memory=cfg.activation_memory)
        curve.append(round(ca, 4))
        if within_tolerance(ca, ca_val_before, cfg.tolerance):
            for name, value in model.state_dict().items():
                best["state"][name].copy_(value)
            best.update(epoch=epoch, ca=ca)
        if epoch in ends:  # a round ends: the tile proxies are fitted again on the model as it is now
            current, part = _refit(ctx, model, current, seed=cfg.seed + len(refits) + 1)
            refits.append({"after_epoch": epoch, **part})

    steps: dict = {}
    with autocast(ctx.x_opt.device, cfg.precision):
        finetune_pruned(model, ctx.groups, prune, ctx.x_opt, ctx.y_opt, epochs=epochs, lr=cfg.purify_lr,
                        seed=cfg.seed, rho=cfg.sam_rho if sam else 0.0, augment=augment, after_epoch=check,
                        teacher=ctx.model if cfg.purify_distill else None, temperature=DISTILL_TEMPERATURE,
                        hard_weight=cfg.purify_hard, labels_where_wrong=cfg.purify_labels_where_wrong,
                        cosine_t_max=0 if cfg.purify_cosine else None,
                        max_grad_norm=clip, path=cfg.purify_path, progress=ctx.progress,
                        max_memory=cfg.activation_memory, info=steps)
    model.load_state_dict(best["state"])
    return {"mode": mode, "precision": cfg.precision, "sam_rho": cfg.sam_rho if sam else 0.0,
            "proxy_images_per_epoch": (len(ctx.x_opt) * (len(proxies.patterns) if cfg.purify_every_family and not tiles
                                                        else 1) if proxies is not None else 0),
            "tile_proxies": len(proxies.tile_masks) if tiles else 0,
            "tile_class": proxies.tile_class if tiles else None,
            "rounds": len(refits) + 1, "refits": refits,
            "images": len(ctx.x_opt), "epochs": epochs, "lr": cfg.purify_lr,
            "batch": steps.get("batch"), "micro_batch": steps.get("micro_batch"),
            "micro_batches": steps.get("micro_batches", 1),
            "grad_clip": clip, "path_step": cfg.purify_path,
            "distill_temperature": DISTILL_TEMPERATURE if cfg.purify_distill else None,
            "hard_label_share": cfg.purify_hard if cfg.purify_distill else None,
            "labels_where_wrong": cfg.purify_labels_where_wrong if cfg.purify_distill else None,
            "lr_schedule": "cosine" if cfg.purify_cosine else "constant",
            "kept_epochs": best["epoch"], "ca_val_per_epoch": curve,
            "ca_val_after": best["ca"] if best["ca"] is not None else accuracy_of(model, ctx.x_val, ctx.y_val,
                                                                                  max_memory=cfg.activation_memory),
            "kept": best["epoch"] > 0}


def _refit(ctx: DefenseContext, model: nn.Module, proxies: ProxySet, seed: int) -> tuple[ProxySet, dict]:
    """The tile proxies of `proxies` fitted again on `model` (its weights as they are, mid-purification), started
    from where they stand (`tile_proxies`' init), at the trigger phase's base steps, batch and lr
    (`resolve_setting`: a tiled model's longer patch family aside) and the penalty REFIT_LAM on D_opt, at float32
    as the trigger phase is -> (the set with the refitted proxies that still send TILE_FLIP of the images to the
    class, or `proxies` itself when none does, its report part: {"kept": those refitted, "mask_l1": their masks'
    mean L1 (None when none is kept)})."""
    cfg = ctx.cfg
    steps, batch, lr = resolve_setting(ctx.x_opt.shape, cfg.trigger_steps, cfg.trigger_batch, cfg.trigger_lr)
    with torch.enable_grad(), full_precision(ctx.x_opt.device):
        masks, patterns = tile_proxies(model, ctx.x_opt, ctx.y_opt, proxies.tile_class, None, steps=steps,
                                       batch=batch, lr=lr, lam=REFIT_LAM, seed=seed, max_memory=cfg.activation_memory,
                                       init=(proxies.tile_masks, proxies.tile_patterns))
    if not len(masks):
        return proxies, {"kept": 0, "mask_l1": None}
    return (replace(proxies, tile_masks=masks, tile_patterns=patterns),
            {"kept": len(masks), "mask_l1": round(float(masks.sum(dim=(1, 2, 3)).mean()), 3)})
