"""scan(): is this model backdoored, and towards which class? The trigger proxies repair synthesises
(trigger.synthesize_proxies on prepare's D_opt split, same seed and settings), summarised: per family and class
the proxy size and its MAD anomaly index, and the class that stands out by the gate (RepairConfig's
anomaly_threshold, Neural Cleanse's rule), if any. Nothing here reads a real trigger or test data.

    result = scan(model, x, y, num_classes, RepairConfig(seed=0))
    result["target"]  # the flagged class, or None
"""
from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn as nn

from ..data import stratified_split
from .context import Phase, RepairConfig, checked_inputs, trigger_run, trigger_settings
from .trigger import ProxySet, synthesize_proxies


def scan_proxies(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                 cfg: RepairConfig | None = None, progress: bool = False) -> ProxySet:
    """The ProxySet `prepare(model, x, y, num_classes, cfg)` builds as `ctx.proxies`: synthesize_proxies on a
    frozen eval copy of `model`, on prepare's D_opt (stratified_split with cfg.val_fraction and cfg.seed), seeded
    with cfg.seed, on cfg.device within cfg.max_memory. x [N, C, H, W] normalised float32, y [N] int64: clean
    defense images. `model` is left as it was; the set comes back on the CPU. UserError for a defense set or
    config no repair can run with."""
    model, cfg = checked_inputs(model, x, y, num_classes, cfg)
    i_opt = _d_opt(y, cfg)
    with Phase("trigger", {}, progress):
        return synthesize_proxies(model, x[i_opt].to(cfg.device), y[i_opt].to(cfg.device), num_classes,
                                  **trigger_settings(cfg, x.shape, model), progress=progress,
                                  max_memory=cfg.activation_memory).to("cpu")


def _d_opt(y: torch.Tensor, cfg: RepairConfig) -> torch.Tensor:
    """y [N] -> the indices [n_opt] of prepare's D_opt (the part the proxies are fitted on)."""
    return stratified_split(y.cpu(), cfg.val_fraction, cfg.seed)[0]


def summarize(proxies: ProxySet, gate: float) -> dict:
    """A ProxySet -> its verdict as a JSON-able dict (R classes with a proxy, F families in `proxies.patterns`'
    order):

    classes: [R] the class of each entry below (every class, unless the screen kept only some: ProxySet);
    reference: [R] whether that class is in the reference the anomaly index is measured against;
    families: {family: {"norms": [R] proxy sizes (patch: mask L1 in pixels; additive: relative RMS of the
        delta), "z_scores": [R] anomaly index of each class (ProxySet.z_scores), "anomaly_index": the largest,
        "class": its class}};
    per_class_anomaly: [R] each class's largest anomaly index over the families that may name the suspect
        (ProxySet.detect; the purification-only families are listed in `families` but never flag);
    suspect: {"target", "family", "anomaly_index"}: the most anomalous proxy (ProxySet.suspect), flagged or not;
    flagged: whether the suspect's anomaly index is >= gate; target / family / anomaly_index: the suspect's when
        flagged, else None;
    gate: the threshold used."""
    families = {}
    for f in proxies.patterns:
        z = proxies.z_scores(f)
        families[f] = {"norms": [round(float(v), 4) for v in proxies.norms[f]],
                       "z_scores": [round(float(v), 3) for v in z],
                       "anomaly_index": round(float(z.max()), 3), "class": int(proxies.classes[int(z.argmax())])}
    per_class = torch.stack([proxies.z_scores(f) for f in proxies.detecting()]).amax(dim=0)
    s = proxies.suspect()
    suspect = {"target": s.target, "family": s.family, "anomaly_index": round(s.anomaly_index, 3)}
    flagged = s.anomaly_index >= gate
    return {"flagged": flagged, **{k: (v if flagged else None) for k, v in suspect.items()}, "suspect": suspect,
            "gate": gate, "classes": proxies.classes.tolist(), "reference": proxies.reference.tolist(),
            "families": families, "per_class_anomaly": [round(float(v), 3) for v in per_class]}


def scan_with_proxies(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                      cfg: RepairConfig | None = None, progress: bool = False) -> tuple[dict, ProxySet]:
    """(scan's dict, the ProxySet it summarises, on the CPU), for callers that also draw the proxies
    (write_scan_png). A scan purifies nothing: cfg.purify_families are not synthesised and no tile proxies are
    fitted (each family, and the tile fit, has its own random stream, so the detection families and the verdict
    are repair's)."""
    cfg = dataclasses.replace(cfg or RepairConfig(), purify_families=(), purify="none").check()
    t0 = time.perf_counter()
    proxies = scan_proxies(model, x, y, num_classes, cfg, progress)
    result = summarize(proxies, cfg.anomaly_threshold)
    result.update(seed=cfg.seed, defense={"n": len(x), "n_opt": len(_d_opt(y, cfg))},
                  setting=trigger_run(cfg, x.shape), seconds=round(time.perf_counter() - t0, 3))
    return result, proxies


def scan(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: RepairConfig | None = None,
         progress: bool = False) -> dict:
    """Is `model` backdoored, and towards which class? x [N, C, H, W] normalised float32, y [N] int64: clean
    defense images (N >= num_classes). Synthesises the detection families' proxies exactly as repair does
    (scan_proxies: the same function, split, seed and settings, less cfg.purify_families, so scan's verdict is
    repair's `trigger_proxy`) and returns
    `summarize`'s dict with the gate cfg.anomaly_threshold, plus seed, defense {"n": N, "n_opt": the D_opt images
    the proxies were fitted on}, setting (`trigger_run`: steps, images per class per step, Adam rate) and
    seconds. UserError for a bad defense set or config."""
    return scan_with_proxies(model, x, y, num_classes, cfg, progress)[0]
