"""Trigger proxies synthesised from clean data only (Neural Cleanse style), for the reward term CA_T and for
purification.

Families, optimised for every class t in one batched pass (the default: patch and additive):
- patch: x * (1 - M_t) + P_t * M_t, mask M_t [1, H, W], pattern P_t [C, H, W], L1 penalty on M_t (a small patch);
- additive: clip(x + D_t, lo, hi), D_t [C, H, W] over the whole image, penalty on its RMS amplitude (a blend or a
  sinusoid: a global, faint change);
- periodic (opt-in): clip(x + D_t, lo, hi) with D_t = span * tanh(sum_f a_f b_f(j) + sum_f c_f b_f(i)), b_f the
  cosines and sines of every frequency 1..side/2 along the columns j and the rows i: stripes of any frequency,
  phase and mix, and nothing else (a free delta fits every class with an adversarial pattern; a stripe pattern
  is cheap only for a class a periodic trigger was planted for), penalty on its RMS amplitude;
- blend (opt-in): (1 - a_t) x + a_t P_t, a full-image pattern P_t [C, H, W] in the images' range and a strength
  a_t in (0, 1) per class (a blended trigger mixes a fixed picture into the image), penalty on a_t;
- warp (opt-in): x resampled at every pixel shifted by a smooth flow V_t [2, H, W] (WARP_GRID x WARP_GRID control
  points upsampled bicubically, as WaNet draws its warp), penalty on the RMS of V_t in pixels.
Each asks that clean images of other classes be classified as t. A backdoor target needs a far smaller trigger
than the other classes in the family its trigger belongs to: per family, the class with the smallest norm and its
MAD anomaly index (how far below the median, in MAD units) are kept. Nothing here reads a real trigger.

A model that cuts its input into tiles (`tile_side`: a ViT's patch embedding) gets two more things: its patch
family runs longer (a ViT's patch proxies shrink for several times the steps a CNN's need), and the patch family's
most anomalous class gets tile proxies, patch proxies of that class each started on another tile of the input,
for purification: a ViT's backdoor patch may be reached from any tile, and unlearning the proxy of one tile does
not remove it where the others reach it.

Many classes (more than `max_classes`, e.g. 1,000): a screen (`screen_classes`) first fits one universal proxy
per family that sends clean images of any class elsewhere (its cost does not grow with the class count) and ranks
the classes by how much of their probability it moves to them; the proxies are then refined for the leading
candidates and for a seeded random sample of the other classes, the reference whose median and MAD the anomaly
index is measured against. With at most `max_classes` classes every class is refined and is its own reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import all_sum, share, world
from ..memory import fit_batch
from ..progress import bar
from ..torchutil import frozen, gradient_order
from .unlearn import accuracy_of

FAMILIES = ("patch", "additive", "periodic", "blend", "warp")  # every family, in the order of a ProxySet's patterns
DEFAULT_FAMILIES = ("patch", "additive")
DEFAULT_PURIFY_FAMILIES = ("periodic", "blend", "warp")  # for purification only (RepairConfig.purify_families)
ADDITIVE = ("additive", "periodic")  # families whose pattern is a delta added to the image (no mask)
LAM_PERIODIC = 10.0  # the periodic family's size penalty (measurements: docs/design.md, "A periodic proxy family")
LAM_BLEND = 4.0  # the blend family's penalty on its strength (measurements: docs/design.md, "A blend proxy family")
LAM_WARP = 2.0  # the warp family's penalty on its flow's RMS in pixels (docs/design.md, "A warp proxy family")
WARP_GRID = 4  # control points per side of a warp proxy's flow (WaNet's k)
WARP_MAX = 2.0  # the largest displacement of a control point, in pixels
PERIODIC_LR = 0.05  # the periodic family's Adam rate (measurements: docs/design.md, "A periodic proxy family")
MAD_FLOOR = 0.05  # the least MAD, as a fraction of the median norm (measurements: docs/design.md)
MAX_CLASSES = 16  # classes whose proxies are optimised together; more are screened first (docs/design.md)
# a model that cuts its input into tiles (a ViT's patch embedding): its patch family runs TILE_STEPS times the
# other families' steps, and its suspect class gets tile proxies, kept where they move TILE_FLIP of the images,
# at most MAX_TILES of them (measurements: docs/design.md, "Tile proxies for a ViT")
TILE_STEPS = 6
TILE_FLIP = 0.8
MAX_TILES = 16
# the proxies' setting at full effort, (Adam steps, images per class per step, Adam rate), by the images' pixel
# count H x W: the first row whose bound it does not exceed (None: any count). Why: docs/design.md, "Repair time"
TRIGGER_SETTINGS = ((16 * 16, (50, 12, 0.2)), (64 * 64, (100, 24, 0.1)), (None, (50, 12, 0.2)))


def trigger_setting(shape) -> tuple[int, int, float]:
    """An image shape [..., H, W] -> (steps, batch, lr): TRIGGER_SETTINGS' row for its pixel count."""
    pixels = int(shape[-2]) * int(shape[-1])
    return next(setting for bound, setting in TRIGGER_SETTINGS if bound is None or pixels <= bound)


def resolve_setting(shape, steps: int | None, batch: int | None, lr: float | None) -> tuple[int, int, float]:
    """(steps, batch, lr) for images of shape [..., H, W], each None taken from `trigger_setting(shape)`."""
    full = trigger_setting(shape)
    return tuple(full[i] if v is None else v for i, v in enumerate((steps, batch, lr)))


def _patch(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """The patch family's stamp x * (1 - mask) + pattern * mask (broadcast)."""
    return x * (1 - mask) + pattern * mask


def _additive(x: torch.Tensor, delta: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The additive family's stamp clip(x + delta, lo, hi) (broadcast)."""
    return torch.maximum(torch.minimum(x + delta, hi), lo)


def _blend(x: torch.Tensor, strength: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """The blend family's stamp (1 - strength) x + strength pattern (broadcast; strength [..., 1, 1, 1])."""
    return x + strength * (pattern - x)


def _warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """The warp family's stamp: x [..., C, H, W] resampled (bilinear, edges repeated) at pixel (row + flow[1],
    column + flow[0]); flow [..., 2, H, W] in pixels, its leading dimensions broadcast against x's."""
    c, h, w = x.shape[-3:]
    lead = torch.broadcast_shapes(x.shape[:-3], flow.shape[:-3])
    xs = x.expand(*lead, c, h, w).reshape(-1, c, h, w)
    fl = flow.expand(*lead, 2, h, w).reshape(-1, 2, h, w)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device), torch.linspace(-1, 1, w, device=x.device),
                            indexing="ij")
    per_pixel = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], device=x.device).view(1, 2, 1, 1)
    grid = torch.stack((xx, yy)).unsqueeze(0) + fl * per_pixel  # [N, 2, H, W], (x, y) as grid_sample wants
    out = F.grid_sample(xs, grid.permute(0, 2, 3, 1), mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(*lead, c, h, w)


def _stamp(family: str, x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor | None,
           strength: torch.Tensor | float | None, lo: torch.Tensor | None, hi: torch.Tensor | None) -> torch.Tensor:
    """x stamped with a proxy of `family` (broadcast): its pattern, and the patch's mask, the blend's strength or
    the additive families' bounds lo/hi (the others' are not read)."""
    if family == "blend":
        return _blend(x, strength, pattern)
    if family == "warp":
        return _warp(x, pattern)
    if family in ADDITIVE:
        return _additive(x, pattern, lo, hi)
    return _patch(x, mask, pattern)


@dataclass
class TriggerProxy:
    """One class's proxy trigger in the model's input space. family "patch": mask [1, H, W] and pattern
    [C, H, W]; "additive", "periodic": pattern [C, H, W] is the added delta (mask None), clipped to lo/hi
    [1, C, 1, 1]; "blend": pattern [C, H, W] is the picture mixed in at `strength` (mask None); "warp": pattern
    [2, H, W] is the flow in pixels (x, y displacement) the image is resampled at (mask None).
    target: its class; norms [T]: its family's per-class trigger norms; anomaly_index: the target's."""

    mask: torch.Tensor | None
    pattern: torch.Tensor
    target: int
    norms: torch.Tensor
    anomaly_index: float
    family: str = "patch"
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    strength: float | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W] (normalised) -> stamped [N, C, H, W]."""
        return _stamp(self.family, x, self.pattern, self.mask, self.strength, self.lo, self.hi)


@dataclass
class ProxySet:
    """The proxies of R classes (rows) in every family: classes [R] int64, the class of each row (ascending;
    every class 0..T-1 when none was screened out); masks [R, 1, H, W] (patch), patterns {family: [R, C, H, W]},
    norms {family: [R]} (patch: mask L1; additive, periodic: RMS of D_t over the input range; blend: the strength
    a_t its stamp mixes the pattern in at; warp: the RMS of its flow [R, 2, H, W] in pixels), lo/hi
    [1, C, 1, 1]: the defense images' per-channel range; reference [R] bool: the rows the anomaly index is
    measured against (every row when none was screened out; else the random sample of the classes the screen did
    not pick); detect: the families that may name the suspect (None: every family; the others' proxies serve
    purification only); tile_masks [S, 1, H, W], tile_patterns [S, C, H, W]: the tile proxies of class
    tile_class (None: none, the model is not tiled or no tile proxy moved the images), purification's alone."""

    masks: torch.Tensor
    patterns: dict[str, torch.Tensor]
    norms: dict[str, torch.Tensor]
    lo: torch.Tensor
    hi: torch.Tensor
    classes: torch.Tensor | None = None
    reference: torch.Tensor | None = None
    detect: tuple[str, ...] | None = None
    tile_masks: torch.Tensor | None = None
    tile_patterns: torch.Tensor | None = None
    tile_class: int | None = None

    def __post_init__(self):
        rows = len(self.masks)
        if self.classes is None:
            self.classes = torch.arange(rows)
        if self.reference is None:
            self.reference = torch.ones(rows, dtype=torch.bool)

    def row(self, cls: int) -> int:
        """The row of class `cls`; KeyError when it has no proxy (screened out)."""
        hit = torch.nonzero(self.classes.cpu() == int(cls)).flatten()
        if len(hit) == 0:
            raise KeyError(f"class {cls} has no proxy (screened out)")
        return int(hit[0])

    def z_scores(self, family: str) -> torch.Tensor:
        """[R]: (median - norm_r) / (1.4826 MAD), the median and MAD of the family's norms over the reference
        rows, the anomaly index of each row's class; the MAD is at least MAD_FLOOR x the median, so a family whose
        norms cluster tightly does not turn a few percent into an anomaly."""
        n = self.norms[family]
        ref = n[self.reference.to(n.device)]
        med = ref.median()
        mad = torch.maximum((ref - med).abs().median(), MAD_FLOOR * med.abs()).clamp(min=1e-8)
        return (med - n) / (1.4826 * mad)

    def anomaly(self) -> dict[str, float]:
        """{family: the largest anomaly index of its classes}."""
        return {f: float(self.z_scores(f).max()) for f in self.patterns}

    def proxy(self, family: str, t: int) -> TriggerProxy:
        """Class t's proxy in `family` (KeyError when t has none)."""
        r = self.row(t)
        return TriggerProxy(mask=self.masks[r].clone() if family == "patch" else None,
                            pattern=self.patterns[family][r].clone(), target=int(t), norms=self.norms[family],
                            anomaly_index=float(self.z_scores(family)[r]), family=family, lo=self.lo, hi=self.hi,
                            strength=float(self.norms[family][r]) if family == "blend" else None)

    def detecting(self) -> list[str]:
        """The families that may name the suspect, in `patterns`' order (every one when `detect` is None)."""
        return [f for f in self.patterns if self.detect is None or f in self.detect]

    def suspect(self) -> TriggerProxy:
        """The most anomalous class of the most anomalous family among `detect` (ties: the first family)."""
        family = max(self.detecting(), key=lambda f: float(self.z_scores(f).max()))
        return self.proxy(family, int(self.classes[int(self.z_scores(family).argmax())]))

    def stamp(self, x: torch.Tensor, family: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W]; family [N] int64 (index into FAMILIES' order of `patterns`), cls [N] int64 rows ->
        each image stamped with the proxy of its (family, row) [N, C, H, W]."""
        names = list(self.patterns)
        out = x.clone()
        for fi, name in enumerate(names):
            sel = family == fi
            if not bool(sel.any()):
                continue
            rows = cls[sel]
            out[sel] = _stamp(name, x[sel], self.patterns[name][rows], self.masks[rows] if name == "patch" else None,
                              self.norms[name][rows].view(-1, 1, 1, 1) if name == "blend" else None, self.lo, self.hi)
        return out

    def sample(self, y: torch.Tensor, gen: torch.Generator, temperature: float = 1.0, family: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """For labels y [N] -> (family [N], row [N]) on y's device, drawn from softmax(z / temperature) over
        every (family, row) pair whose class != y (only that family's pairs when `family`, an index into
        `patterns`' order, is given): suspicious classes are drawn most, none is left out. The draw runs on the
        CPU (gen is a CPU generator), so a seed draws the same pairs on every device."""
        z = torch.stack([self.z_scores(f) for f in self.patterns]).cpu()  # [F, R]
        nf, nt = z.shape
        logits = (z / temperature).reshape(1, -1).expand(len(y), -1).clone()  # [N, F*R]
        own = self.classes.cpu()[torch.arange(nf * nt) % nt]
        logits[own.unsqueeze(0) == y.cpu().unsqueeze(1)] = -float("inf")
        if family is not None:
            logits[:, torch.arange(nf * nt) // nt != family] = -float("inf")
        pick = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=gen).squeeze(1).to(y.device)
        return pick // nt, pick % nt

    def stamp_tiles(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """x [N, C, H, W] -> each image stamped with one of the tile proxies, drawn uniformly on the CPU
        generator `gen` [N, C, H, W]; ValueError when the set has none."""
        if self.tile_masks is None:
            raise ValueError("this proxy set has no tile proxies")
        k = torch.randint(0, len(self.tile_masks), (len(x),), generator=gen).to(x.device)
        return _patch(x, self.tile_masks[k], self.tile_patterns[k])

    def to(self, device: str | torch.device) -> "ProxySet":
        """This set with every tensor on `device` (a copy; itself where they are there already)."""
        move = (lambda t: None if t is None else t.to(device))
        return ProxySet(masks=move(self.masks), patterns={f: move(p) for f, p in self.patterns.items()},
                        norms={f: move(n) for f, n in self.norms.items()}, lo=move(self.lo), hi=move(self.hi),
                        classes=self.classes, reference=self.reference, detect=self.detect,
                        tile_masks=move(self.tile_masks), tile_patterns=move(self.tile_patterns),
                        tile_class=self.tile_class)


def tile_side(model: nn.Module) -> int | None:
    """The side p of the tiles a model cuts its input into, when its first Conv2d (in module order) has a square
    p x p kernel with stride p > 1, no padding and no dilation (a ViT's patch embedding, a patchify stem); else
    None (a CNN; a scripted model, whose modules are not nn.Conv2d)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return None
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    flat = all(v == 0 for v in conv.padding) if isinstance(conv.padding, tuple) else False
    ok = kh == kw == sh == sw and kh > 1 and flat and tuple(conv.dilation) == (1, 1)
    return int(kh) if ok else None


def synthesize_proxies(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
                       steps: int | None = None, batch: int | None = None, lam: float = 10.0,
                       lam_additive: float = 10.0, lr: float | None = None,
                       lam_periodic: float = LAM_PERIODIC, lam_blend: float = LAM_BLEND, lam_warp: float = LAM_WARP,
                       seed: int = 0, families: tuple[str, ...] = DEFAULT_FAMILIES, max_classes: int = MAX_CLASSES,
                       detect: tuple[str, ...] | None = None, tile: int | None = None, tile_fit: bool = True,
                       progress: bool = False,
                       max_memory: int | str | None = None) -> ProxySet:
    """x [N, C, H, W] normalised clean images, y [N] int64 (on the model's device) -> the proxies in every family
    of `families` of every class (at most `max_classes` classes), else of the `max_classes // 2` classes
    `screen_classes` ranks first and of a seeded random sample of the others (the reference, max_classes minus
    those), on that device. `steps` Adam steps (lr) on `batch` images per class per step (each None: the images'
    `trigger_setting`), all families in one forward (channels-last where the model takes it:
    `torchutil.gradient_order`); lam weighs the mean mask value, lam_additive (lam_periodic) the relative RMS of the
    additive (periodic) D_t, lam_blend the blend's strength a_t, lam_warp the RMS in pixels of the warp's flow
    (WARP_GRID x WARP_GRID control points, at most WARP_MAX pixels each), against the cross-entropy (the defaults'
    measurements: docs/design.md; the periodic family's coefficients take Adam at PERIODIC_LR). The model stays
    frozen in eval mode, so the step's loss is a sum over images: where `max_memory` (bytes or "512MB"; None: no
    budget) cannot hold the step's F x R x batch stamped images at once, they run in chunks whose gradients add up
    to the same step (`memory.fit_batch`). Under torch.distributed each rank passes its share of every step's
    stamped images (`distributed.share`; the tile proxies' too) and the gradients are summed over the ranks, so
    every rank fits the same proxies, up to the order of float sums.
    The random draws come from CPU generators whatever the device. detect: the families that may name the
    suspect (ProxySet.detect; None: every one). tile: the model's tile side (`tile_side`; None: not tiled): the
    patch family then runs TILE_STEPS x steps (the other families stop at `steps`; the later steps stamp the patch
    family alone), and the patch family's most anomalous class gets tile proxies (`tile_proxies`, the patch
    family's steps, batch, lr and lam) unless tile_fit is False (they serve purification alone). progress: a bar
    of the steps on stderr (onp_fast.progress.bar)."""
    if max_classes < 2:
        raise ValueError(f"max_classes must be at least 2, got {max_classes}")
    steps, batch, lr = resolve_setting(x.shape, steps, batch, lr)
    detect = None if detect is None else tuple(f for f in families if f in detect)
    if num_classes <= max_classes:
        classes, reference = torch.arange(num_classes), None
    else:
        ranked = screen_classes(model, x, y, num_classes, steps=steps, batch=batch, lam=lam,
                                lam_additive=lam_additive, lr=lr, seed=seed,
                                families=families if detect is None else detect,
                                progress=progress, max_memory=max_memory).argsort(descending=True, stable=True)
        keep = max_classes // 2
        rest = ranked[keep:]
        pick = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed + 2))[
            : max_classes - keep]]
        classes = torch.cat([ranked[:keep], pick]).sort().values
        reference = torch.isin(classes, pick)
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = x.shape
    rows = len(classes)
    dev = x.device
    lo, hi = _range(x)
    span = hi - lo
    mlog = torch.full((rows, 1, h, w), -3.0, device=dev).requires_grad_(True)
    plog = (torch.randn(rows, c, h, w, generator=g) * 0.1).to(dev).requires_grad_(True)
    g_add = torch.Generator().manual_seed(seed + 1)  # its own stream: the patch family is as without it
    dlog = (torch.randn(rows, c, h, w, generator=g_add) * 0.01).to(dev).requires_grad_(True)
    waves = _Waves(rows, c, h, w, seed, dev)  # its own stream: the other families are as without it
    blend = _Blend(rows, c, h, w, seed, dev)  # its own stream too
    warp = _Flow(rows, h, w, seed, dev)  # and this one
    owned = {"patch": [mlog, plog], "additive": [dlog], "periodic": waves.params, "blend": blend.params,
             "warp": warp.params}  # each family's parameters: a step sums over the ranks those of its families
    opt = _adam([t for f in ("patch", "additive", "blend", "warp") if f in families for t in owned[f]],
                owned["periodic"] if "periodic" in families else [], lr)
    rank, size = world()
    targets = classes.to(dev)
    per_step = rows * batch * sum(f in families for f in FAMILIES)  # stamped images per step
    chunk = fit_batch(model, x, max_memory, per_step)
    layout = gradient_order(model, x)

    def current():
        m, p = torch.sigmoid(mlog), lo + span * torch.sigmoid(plog)
        d = span * torch.tanh(dlog)
        return m, p, d, waves.delta(span), blend.strength(), blend.pattern(lo, span), warp.flow()

    patch_steps = steps * TILE_STEPS if tile and "patch" in families else steps
    with frozen(model), bar(patch_steps, "trigger proxies", progress) as shown:
        for step in range(patch_steps):
            on = families if step < steps else ("patch",)
            idx = torch.randint(0, n, (batch,), generator=g).to(dev)
            xb, yb = x[idx], y[idx]
            m, p, d, pd, ba, bp, fl = current()
            parts, penalty = [], 0.0
            if "patch" in on:
                # _patch's formula with pattern * mask taken before the broadcast (the gradients' summation
                # order, and so the proxies, stay bit-identical to the earlier releases)
                parts.append(xb.unsqueeze(0) * (1 - m.unsqueeze(1)) + (p * m).unsqueeze(1))  # [R, b, C, H, W]
                penalty = penalty + lam * m.mean(dim=(1, 2, 3)).sum()
            if "additive" in on:
                parts.append(_additive(xb.unsqueeze(0), d.unsqueeze(1), lo, hi))
                penalty = penalty + lam_additive * _rms(d / span).sum()
            if "periodic" in on:
                parts.append(_additive(xb.unsqueeze(0), pd.unsqueeze(1), lo, hi))
                penalty = penalty + lam_periodic * _rms(pd / span).sum()
            if "blend" in on:
                parts.append(_blend(xb.unsqueeze(0), ba.view(-1, 1, 1, 1, 1), bp.unsqueeze(1)))
                penalty = penalty + lam_blend * ba.sum()
            if "warp" in on:
                parts.append(_warp(xb.unsqueeze(0), fl.unsqueeze(1)))
                penalty = penalty + lam_warp * _rms(fl).sum()
            stamped = layout(torch.cat(parts).reshape(-1, c, h, w))
            tgt = targets.repeat_interleave(batch).repeat(len(parts))
            other = (yb.unsqueeze(0) != targets.unsqueeze(1)).reshape(-1).float().repeat(len(parts))
            mine = share(len(stamped), rank, size)  # every row when there is one process
            opt.zero_grad(set_to_none=True)
            for s0 in range(mine.start, mine.stop, chunk):  # one chunk at the default budget: the step as it was
                s1 = min(mine.stop, s0 + chunk)
                logits = model(stamped[s0:s1])
                ce = (F.cross_entropy(logits, tgt[s0:s1], reduction="none") * other[s0:s1]).sum() \
                    / other.sum().clamp(min=1)
                loss = ce * rows * len(parts) + (penalty if s0 == 0 else 0.0)
                loss.backward(retain_graph=s1 < mine.stop)
                del logits, ce, loss  # the retained graph frees this chunk's activations before the next forward
            _sum_gradients([t for f in on for t in owned[f]], size)
            opt.step()
            shown.update(1)
    with torch.no_grad():
        m, p, d, pd, ba, bp, fl = current()
        patterns, norms = {}, {}
        if "patch" in families:
            patterns["patch"], norms["patch"] = p.clone(), m.sum(dim=(1, 2, 3))
        if "additive" in families:
            patterns["additive"], norms["additive"] = d.clone(), _rms(d / span)
        if "periodic" in families:
            patterns["periodic"], norms["periodic"] = pd.clone(), _rms(pd / span)
        if "blend" in families:
            patterns["blend"], norms["blend"] = bp.clone(), ba.clone()
        if "warp" in families:
            patterns["warp"], norms["warp"] = fl.clone(), _rms(fl)
    out = ProxySet(masks=m.clone(), patterns=patterns, norms=norms, lo=lo, hi=hi, classes=classes,
                   reference=reference, detect=detect)
    if patch_steps > steps and tile_fit:
        cls = int(classes[int(out.z_scores("patch").argmax())])
        masks, patterns = tile_proxies(model, x, y, cls, tile, steps=patch_steps, batch=batch, lr=lr, lam=lam,
                                       seed=seed, progress=progress, max_memory=max_memory)
        if len(masks):  # else the set keeps None: no tile proxy moved the images
            out.tile_masks, out.tile_patterns, out.tile_class = masks, patterns, cls
    return out


def tile_starts(h: int, w: int, tile: int) -> list[tuple[int, int]]:
    """The top-left pixels of the tile x tile tiles of an h x w image, row by row; at most MAX_TILES of them,
    evenly spread over that order when there are more."""
    starts = [(i, j) for i in range(0, h - tile + 1, tile) for j in range(0, w - tile + 1, tile)]
    if len(starts) <= MAX_TILES:
        return starts
    return [starts[int(k)] for k in torch.linspace(0, len(starts) - 1, MAX_TILES).round().long()]


def tile_proxies(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cls: int, tile: int | None, *, steps: int,
                 batch: int, lr: float, lam: float = 10.0, seed: int = 0, progress: bool = False,
                 max_memory: int | str | None = None,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch proxies of class `cls`, one started on each tile (`tile_starts`: its mask's logits 0 on the tile,
    -3 elsewhere, where `synthesize_proxies` starts every pixel at -3), fitted together as the patch family is
    (`steps` Adam steps at lr on `batch` images of other classes each, penalty lam on the mean mask value).
    init: (masks [S, 1, H, W], patterns [S, C, H, W]) to start from instead (a refit of proxies fitted before, on
    the model as it is now: purification's later rounds; `tile` is then not read). x [N, C, H, W] normalised
    clean images, y [N] (on the model's device) -> (masks [S, 1, H, W], patterns [S, C, H, W]) of the S proxies
    that send at least TILE_FLIP of x's images of other classes to cls (S may be 0). The model stays frozen in
    eval mode; the draws come from a CPU generator; images run in chunks `max_memory` holds; under
    torch.distributed each rank passes its share of every step's stamped images, the gradients summed over the
    ranks."""
    n, c, h, w = x.shape
    dev = x.device
    lo, hi = _range(x)
    span = hi - lo
    g = torch.Generator().manual_seed(seed + 4)
    if init is None:
        starts = tile_starts(h, w, tile)
        mlog = torch.full((len(starts), 1, h, w), -3.0, device=dev)
        for k, (i, j) in enumerate(starts):
            mlog[k, :, i:i + tile, j:j + tile] = 0.0
        plog = (torch.randn(len(starts), c, h, w, generator=g) * 0.1).to(dev)
    else:  # the sigmoids' inverses, clamped off 0 and 1 where a value sits at an end
        mlog = torch.logit(init[0].detach().to(dev).clamp(1e-4, 1 - 1e-4))
        plog = torch.logit(((init[1].detach().to(dev) - lo) / span).clamp(1e-4, 1 - 1e-4))
    count = len(mlog)
    mlog, plog = mlog.clone().requires_grad_(True), plog.clone().requires_grad_(True)
    opt = torch.optim.Adam([mlog, plog], lr=lr)
    pool = torch.nonzero(y != cls).flatten()
    if len(pool) == 0:
        return mlog.detach()[:0], plog.detach()[:0]
    chunk = fit_batch(model, x, max_memory, count * batch)
    layout = gradient_order(model, x)
    rank, size = world()
    with frozen(model), bar(steps, f"tile proxies of class {cls}", progress) as shown:
        for _ in range(steps):
            xb = x[pool[torch.randint(0, len(pool), (batch,), generator=g).to(dev)]]
            m, p = torch.sigmoid(mlog), lo + span * torch.sigmoid(plog)
            stamped = layout(_patch(xb.unsqueeze(0), m.unsqueeze(1), p.unsqueeze(1)).reshape(-1, c, h, w))
            opt.zero_grad(set_to_none=True)
            penalty = lam * m.mean(dim=(1, 2, 3)).sum()
            mine = share(len(stamped), rank, size)  # every row when there is one process
            for s0 in range(mine.start, mine.stop, chunk):
                s1 = min(mine.stop, s0 + chunk)
                logits = model(stamped[s0:s1])
                target = torch.full((s1 - s0,), cls, device=dev)
                loss = F.cross_entropy(logits, target, reduction="sum") / batch + (penalty if s0 == 0 else 0.0)
                loss.backward(retain_graph=s1 < mine.stop)
                del logits, loss
            _sum_gradients([mlog, plog], size)
            opt.step()
            shown.update(1)
    with torch.no_grad(), frozen(model):
        m, p = torch.sigmoid(mlog), lo + span * torch.sigmoid(plog)
        xo, target = x[pool], torch.full((len(pool),), cls, device=dev)
        keep = torch.tensor([accuracy_of(model, _patch(xo, m[k], p[k]), target, max_memory=max_memory) >= TILE_FLIP
                             for k in range(count)], device=dev)
    return m[keep].clone(), p[keep].clone()


def _sum_gradients(params: list[torch.Tensor], size: int) -> None:
    """Under torch.distributed (size > 1), each of `params`' gradients replaced by its sum over the ranks (a rank
    that passed no image of the step contributes zeros), so every rank takes the same optimiser step; nothing
    with one process. Only the parameters the step's loss reads may be passed: Adam moves a parameter whose
    gradient is zero but not one whose gradient is None."""
    if size == 1:
        return
    for t in params:
        if t.grad is None:
            t.grad = torch.zeros_like(t)
    all_sum([t.grad for t in params])


def screen_classes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
                   steps: int | None = None, batch: int | None = None, lam: float = 10.0,
                   lam_additive: float = 10.0, lr: float | None = None, seed: int = 0,
                   lam_periodic: float = LAM_PERIODIC, lam_blend: float = LAM_BLEND, lam_warp: float = LAM_WARP,
                   families: tuple[str, ...] = DEFAULT_FAMILIES, progress: bool = False,
                   max_memory: int | str | None = None) -> torch.Tensor:
    """Ranks every class as a likely backdoor target at a cost that does not grow with the class count.
    x [N, C, H, W] normalised clean images, y [N] int64 (on the model's device) -> scores [num_classes] float32
    on the CPU, higher = more suspect. One universal proxy per family (a patch: mask [1, 1, H, W] and pattern; an
    additive delta [1, C, H, W]; a periodic one; a blend; a warp) is fitted, `steps` Adam steps (lr) on `batch`
    images (each None: the images' `trigger_setting`), to lower
    the probability of each image's own class (untargeted), with the size penalties of `synthesize_proxies`
    (lam, lam_additive, lam_periodic, lam_blend, lam_warp; a warp too): the cheapest way to move every image
    elsewhere is a backdoor's trigger, and it moves them to its target.
    Score of class t: the mean probability of t over every (family, image of another class) after the fit.
    The model stays frozen in eval mode; images run in chunks `max_memory` can hold (`memory.fit_batch`).
    Under torch.distributed each rank passes its share of every step's stamped images and of the scoring
    images (`distributed.share`), the proxies' gradients and the scores summed over the ranks (`all_sum`): every
    rank fits the same proxies, up to the order of float sums."""
    steps, batch, lr = resolve_setting(x.shape, steps, batch, lr)
    g = torch.Generator().manual_seed(seed + 3)
    n, c, h, w = x.shape
    dev = x.device
    lo, hi = _range(x)
    span = hi - lo
    mlog = torch.full((1, 1, h, w), -3.0, device=dev).requires_grad_(True)
    plog = (torch.randn(1, c, h, w, generator=g) * 0.1).to(dev).requires_grad_(True)
    dlog = (torch.randn(1, c, h, w, generator=g) * 0.01).to(dev).requires_grad_(True)
    waves = _Waves(1, c, h, w, seed + 3, dev)
    blend = _Blend(1, c, h, w, seed + 3, dev)
    warp = _Flow(1, h, w, seed + 3, dev)
    opt = _adam(([mlog, plog] if "patch" in families else []) + ([dlog] if "additive" in families else [])
                + (blend.params if "blend" in families else []) + (warp.params if "warp" in families else []),
                waves.params if "periodic" in families else [], lr)

    def stamps(xb):
        m, p, d = torch.sigmoid(mlog), lo + span * torch.sigmoid(plog), span * torch.tanh(dlog)
        pd, ba, bp, fl = waves.delta(span), blend.strength(), blend.pattern(lo, span), warp.flow()
        out = ([_patch(xb, m, p)] if "patch" in families else []) + \
              ([_additive(xb, d, lo, hi)] if "additive" in families else []) + \
              ([_additive(xb, pd, lo, hi)] if "periodic" in families else []) + \
              ([_blend(xb, ba.view(-1, 1, 1, 1), bp)] if "blend" in families else []) + \
              ([_warp(xb, fl)] if "warp" in families else [])
        penalty = (lam * m.mean() if "patch" in families else 0.0) + \
                  (lam_additive * _rms(d / span).sum() if "additive" in families else 0.0) + \
                  (lam_periodic * _rms(pd / span).sum() if "periodic" in families else 0.0) + \
                  (lam_blend * ba.sum() if "blend" in families else 0.0) + \
                  (lam_warp * _rms(fl).sum() if "warp" in families else 0.0)
        return torch.cat(out), penalty

    fams = sum(f in families for f in FAMILIES)
    chunk = fit_batch(model, x, max_memory, batch * fams)
    layout = gradient_order(model, x)
    rank, size = world()
    params = [t for group in opt.param_groups for t in group["params"]]
    with frozen(model), bar(steps, "trigger screen", progress) as shown:
        for _ in range(steps):
            idx = torch.randint(0, n, (batch,), generator=g).to(dev)
            stamped, penalty = stamps(x[idx])
            stamped = layout(stamped)
            own = y[idx].repeat(fams)
            mine = share(len(stamped), rank, size)  # every row when there is one process
            opt.zero_grad(set_to_none=True)
            for s0 in range(mine.start, mine.stop, chunk):
                s1 = min(mine.stop, s0 + chunk)
                p_own = F.softmax(model(stamped[s0:s1]), dim=1).gather(1, own[s0:s1, None]).sum() / len(stamped)
                (p_own + (penalty if s0 == 0 else 0.0)).backward(retain_graph=s1 < mine.stop)
                del p_own  # the retained graph frees this chunk's activations before the next forward
            _sum_gradients(params, size)
            opt.step()
            shown.update(1)
    scores = torch.zeros(num_classes, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    step = max(1, chunk // fams)
    mine = share(n, rank, size)
    with torch.no_grad(), frozen(model):
        for s0 in range(mine.start, mine.stop, step):
            stamped, _ = stamps(x[s0:min(s0 + step, mine.stop)])
            prob = F.softmax(model(stamped), dim=1).double().cpu()  # [F*b, T]
            own = y[s0:min(s0 + step, mine.stop)].cpu().repeat(fams)
            other = torch.ones_like(prob)
            other[torch.arange(len(own)), own] = 0.0
            scores += (prob * other).sum(0)
            counts += other.sum(0)
    all_sum([scores, counts])
    return (scores / counts.clamp(min=1)).float()


class _Waves:
    """The periodic family's proxies of `rows` classes: coefficients over the cosines and sines of frequencies
    1..W//2 along the columns [rows, C, 2 (W//2)] and 1..H//2 along the rows [rows, C, 2 (H//2)], drawn from a
    generator of their own (seed + 4) at scale 0.01; `delta(span)` -> D [rows, C, H, W] = span * tanh(the column
    waves + the row waves)."""

    def __init__(self, rows: int, c: int, h: int, w: int, seed: int, device):
        g = torch.Generator().manual_seed(seed + 4)
        self.cols, self.rows = _waves(w).to(device), _waves(h).to(device)
        self.a = (torch.randn(rows, c, len(self.cols), generator=g) * 0.01).to(device).requires_grad_(True)
        self.b = (torch.randn(rows, c, len(self.rows), generator=g) * 0.01).to(device).requires_grad_(True)
        self.params = [self.a, self.b]

    def delta(self, span: torch.Tensor) -> torch.Tensor:
        return span * torch.tanh((self.a @ self.cols).unsqueeze(2) + (self.b @ self.rows).unsqueeze(3))


class _Blend:
    """The blend family's proxies of `rows` classes: pattern logits [rows, C, H, W] drawn from a generator of their
    own (seed + 5) at scale 0.1, and strength logits [rows] starting at -3 (a = 0.047); `pattern(lo, span)` ->
    P [rows, C, H, W] = lo + span * sigmoid(logits), `strength()` -> a [rows] = sigmoid(logits)."""

    def __init__(self, rows: int, c: int, h: int, w: int, seed: int, device):
        g = torch.Generator().manual_seed(seed + 5)
        self.logits = (torch.randn(rows, c, h, w, generator=g) * 0.1).to(device).requires_grad_(True)
        self.a = torch.full((rows,), -3.0, device=device).requires_grad_(True)
        self.params = [self.logits, self.a]

    def pattern(self, lo: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
        return lo + span * torch.sigmoid(self.logits)

    def strength(self) -> torch.Tensor:
        return torch.sigmoid(self.a)


class _Flow:
    """The warp family's proxies of `rows` classes: WARP_GRID x WARP_GRID control points of an (x, y)
    displacement per class, logits [rows, 2, k, k] drawn from a generator of their own (seed + 6) at scale 0.01;
    `flow()` -> [rows, 2, H, W] in pixels = WARP_MAX tanh(logits), upsampled bicubically over the image (the
    shape of WaNet's warping field)."""

    def __init__(self, rows: int, h: int, w: int, seed: int, device):
        g = torch.Generator().manual_seed(seed + 6)
        self.logits = (torch.randn(rows, 2, WARP_GRID, WARP_GRID, generator=g) * 0.01).to(device).requires_grad_(True)
        self.size = (h, w)
        self.params = [self.logits]

    def flow(self) -> torch.Tensor:
        return F.interpolate(WARP_MAX * torch.tanh(self.logits), size=self.size, mode="bicubic", align_corners=True)


def _waves(side: int) -> torch.Tensor:
    """[2 (side // 2), side]: cos and sin of 2 pi f i / side for f = 1..side // 2 (at least one frequency)."""
    f = torch.arange(1, max(1, side // 2) + 1, dtype=torch.float32)
    phase = 2 * math.pi * torch.outer(f, torch.arange(side, dtype=torch.float32)) / side
    return torch.cat([phase.cos(), phase.sin()])


def _adam(params: list, periodic: list, lr: float) -> torch.optim.Adam:
    """Adam at lr over params, and at PERIODIC_LR over the periodic family's coefficients (a group of its own:
    Adam's steps are per tensor, so the others step as without it)."""
    groups = ([{"params": params}] if params else []) + ([{"params": periodic, "lr": PERIODIC_LR}] if periodic else [])
    return torch.optim.Adam(groups, lr=lr)


def _range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, C, H, W] -> (lo, hi) [1, C, 1, 1]: the per-channel range of the images, the stamps' bounds."""
    c = x.shape[1]
    return x.amin(dim=(0, 2, 3)).view(1, c, 1, 1), x.amax(dim=(0, 2, 3)).view(1, c, 1, 1)


def _rms(d: torch.Tensor) -> torch.Tensor:
    """[T, C, H, W] -> [T] root mean square."""
    return d.pow(2).mean(dim=(1, 2, 3)).add(1e-12).sqrt()


def synthesize_trigger(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, **kw) -> TriggerProxy:
    """The suspect proxy (ProxySet.suspect) of `synthesize_proxies` with the same arguments."""
    return synthesize_proxies(model, x, y, num_classes, **kw).suspect()
