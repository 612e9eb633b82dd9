"""Trigger proxies synthesised from clean data only (Neural Cleanse style), for the reward term CA_T and for
purification.

Two families, optimised for every class t in one batched pass:
- patch: x * (1 - M_t) + P_t * M_t, mask M_t [1, H, W], pattern P_t [C, H, W], L1 penalty on M_t (a small patch);
- additive: clip(x + D_t, lo, hi), D_t [C, H, W] over the whole image, penalty on its RMS amplitude (a blend or a
  sinusoid: a global, faint change).
Each asks that clean images of other classes be classified as t. A backdoor target needs a far smaller trigger
than the other classes in the family its trigger belongs to: per family, the class with the smallest norm and its
MAD anomaly index (how far below the median, in MAD units) are kept. Nothing here reads a real trigger.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..memory import fit_batch
from ..progress import bar
from ..torchutil import frozen

FAMILIES = ("patch", "additive")
MAD_FLOOR = 0.05  # the least MAD, as a fraction of the median norm (measurements: docs/design.md)


def _patch(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """The patch family's stamp x * (1 - mask) + pattern * mask (broadcast)."""
    return x * (1 - mask) + pattern * mask


def _additive(x: torch.Tensor, delta: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The additive family's stamp clip(x + delta, lo, hi) (broadcast)."""
    return torch.maximum(torch.minimum(x + delta, hi), lo)


@dataclass
class TriggerProxy:
    """One class's proxy trigger in the model's input space. family "patch": mask [1, H, W] and pattern
    [C, H, W]; "additive": pattern [C, H, W] is the added delta (mask None), clipped to lo/hi [1, C, 1, 1].
    target: its class; norms [T]: its family's per-class trigger norms; anomaly_index: the target's."""

    mask: torch.Tensor | None
    pattern: torch.Tensor
    target: int
    norms: torch.Tensor
    anomaly_index: float
    family: str = "patch"
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W] (normalised) -> stamped [N, C, H, W]."""
        if self.family == "additive":
            return _additive(x, self.pattern, self.lo, self.hi)
        return _patch(x, self.mask, self.pattern)


@dataclass
class ProxySet:
    """Every class's proxy in every family. masks [T, 1, H, W] (patch), patterns {family: [T, C, H, W]},
    norms {family: [T]} (patch: mask L1; additive: RMS of D_t over the input range), lo/hi [1, C, 1, 1]: the
    defense images' per-channel range."""

    masks: torch.Tensor
    patterns: dict[str, torch.Tensor]
    norms: dict[str, torch.Tensor]
    lo: torch.Tensor
    hi: torch.Tensor

    def z_scores(self, family: str) -> torch.Tensor:
        """[T]: (median - norm_t) / (1.4826 MAD) of the family's norms, the anomaly index of class t; the MAD is
        at least MAD_FLOOR x the median, so a family whose norms cluster tightly does not turn a few percent
        into an anomaly."""
        n = self.norms[family]
        med = n.median()
        mad = torch.maximum((n - med).abs().median(), MAD_FLOOR * med.abs()).clamp(min=1e-8)
        return (med - n) / (1.4826 * mad)

    def anomaly(self) -> dict[str, float]:
        """{family: the largest anomaly index of its classes}."""
        return {f: float(self.z_scores(f).max()) for f in self.patterns}

    def proxy(self, family: str, t: int) -> TriggerProxy:
        return TriggerProxy(mask=self.masks[t].clone() if family == "patch" else None,
                            pattern=self.patterns[family][t].clone(), target=t, norms=self.norms[family],
                            anomaly_index=float(self.z_scores(family)[t]), family=family, lo=self.lo, hi=self.hi)

    def suspect(self) -> TriggerProxy:
        """The most anomalous class of the most anomalous family (ties: the first family)."""
        family = max(self.patterns, key=lambda f: float(self.z_scores(f).max()))
        return self.proxy(family, int(self.z_scores(family).argmax()))

    def stamp(self, x: torch.Tensor, family: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W]; family [N] int64 (index into FAMILIES' order of `patterns`), cls [N] int64 ->
        each image stamped with the proxy of its (family, class) [N, C, H, W]."""
        names = list(self.patterns)
        out = x.clone()
        for fi, name in enumerate(names):
            sel = family == fi
            if not bool(sel.any()):
                continue
            xs, p = x[sel], self.patterns[name][cls[sel]]
            out[sel] = (_additive(xs, p, self.lo, self.hi) if name == "additive"
                        else _patch(xs, self.masks[cls[sel]], p))
        return out

    def sample(self, y: torch.Tensor, gen: torch.Generator, temperature: float = 1.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """For labels y [N] -> (family [N], class [N]) on y's device, drawn from softmax(z / temperature) over
        every (family, class) pair with class != y: suspicious classes are drawn most, none is left out. The
        draw runs on the CPU (gen is a CPU generator), so a seed draws the same pairs on every device."""
        z = torch.stack([self.z_scores(f) for f in self.patterns]).cpu()  # [F, T]
        nf, nt = z.shape
        logits = (z / temperature).reshape(1, -1).expand(len(y), -1).clone()  # [N, F*T]
        own = torch.arange(nf * nt) % nt
        logits[own.unsqueeze(0) == y.cpu().unsqueeze(1)] = -float("inf")
        pick = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=gen).squeeze(1).to(y.device)
        return pick // nt, pick % nt

    def to(self, device: str | torch.device) -> "ProxySet":
        """This set with every tensor on `device` (a copy; itself where they are there already)."""
        move = (lambda t: t.to(device))
        return ProxySet(masks=move(self.masks), patterns={f: move(p) for f, p in self.patterns.items()},
                        norms={f: move(n) for f, n in self.norms.items()}, lo=move(self.lo), hi=move(self.hi))


def synthesize_proxies(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, *, steps: int = 100,
                       batch: int = 24, lam: float = 10.0, lam_additive: float = 10.0, lr: float = 0.1,
                       seed: int = 0, families: tuple[str, ...] = FAMILIES, progress: bool = False,
                       max_memory: int | str | None = None) -> ProxySet:
    """x [N, C, H, W] normalised clean images, y [N] int64 (on the model's device) -> every class's proxy in
    every family of `families`, on that device. `steps` Adam steps (lr) on `batch` images per class per step,
    all families in one forward; lam weighs the mean mask value, lam_additive the relative RMS of D_t, against
    the cross-entropy (the defaults' measurements: docs/design.md). The model stays frozen in eval mode, so the
    step's loss is a sum over images: where `max_memory` (bytes or "512MB"; None: no budget) cannot hold the
    step's F x T x batch stamped images at once, they run in chunks whose gradients add up to the same step
    (`memory.fit_batch`). The random draws come from CPU generators whatever the device. progress: a bar of the
    steps on stderr (onp_fast.progress.bar)."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = x.shape
    dev = x.device
    lo = x.amin(dim=(0, 2, 3)).view(1, c, 1, 1)
    hi = x.amax(dim=(0, 2, 3)).view(1, c, 1, 1)
    span = hi - lo
    mlog = torch.full((num_classes, 1, h, w), -3.0, device=dev).requires_grad_(True)
    plog = (torch.randn(num_classes, c, h, w, generator=g) * 0.1).to(dev).requires_grad_(True)
    g_add = torch.Generator().manual_seed(seed + 1)  # its own stream: the patch family is as without it
    dlog = (torch.randn(num_classes, c, h, w, generator=g_add) * 0.01).to(dev).requires_grad_(True)
    params = ([mlog, plog] if "patch" in families else []) + ([dlog] if "additive" in families else [])
    opt = torch.optim.Adam(params, lr=lr)
    targets = torch.arange(num_classes, device=dev)
    rows = num_classes * batch * sum(f in families for f in FAMILIES)  # stamped images per step
    chunk = fit_batch(model, x, max_memory, rows)

    def current():
        m, p = torch.sigmoid(mlog), lo + span * torch.sigmoid(plog)
        d = span * torch.tanh(dlog)
        return m, p, d

    with frozen(model), bar(steps, "trigger proxies", progress) as shown:
        for _ in range(steps):
            idx = torch.randint(0, n, (batch,), generator=g).to(dev)
            xb, yb = x[idx], y[idx]
            m, p, d = current()
            parts, penalty = [], 0.0
            if "patch" in families:
                # _patch's formula with pattern * mask taken before the broadcast (the gradients' summation
                # order, and so the proxies, stay bit-identical to the earlier releases)
                parts.append(xb.unsqueeze(0) * (1 - m.unsqueeze(1)) + (p * m).unsqueeze(1))  # [T, b, C, H, W]
                penalty = penalty + lam * m.mean(dim=(1, 2, 3)).sum()
            if "additive" in families:
                parts.append(_additive(xb.unsqueeze(0), d.unsqueeze(1), lo, hi))
                penalty = penalty + lam_additive * _rms(d / span).sum()
            stamped = torch.cat(parts).reshape(-1, c, h, w)
            tgt = targets.repeat_interleave(batch).repeat(len(parts))
            other = (yb.unsqueeze(0) != targets.unsqueeze(1)).reshape(-1).float().repeat(len(parts))
            opt.zero_grad(set_to_none=True)
            for s0 in range(0, len(stamped), chunk):  # one chunk at the default budget: the step as it was
                s1 = min(len(stamped), s0 + chunk)
                logits = model(stamped[s0:s1])
                ce = (F.cross_entropy(logits, tgt[s0:s1], reduction="none") * other[s0:s1]).sum() \
                    / other.sum().clamp(min=1)
                loss = ce * num_classes * len(parts) + (penalty if s0 == 0 else 0.0)
                loss.backward(retain_graph=s1 < len(stamped))
            opt.step()
            shown.update(1)
    with torch.no_grad():
        m, p, d = current()
        patterns, norms = {}, {}
        if "patch" in families:
            patterns["patch"], norms["patch"] = p.clone(), m.sum(dim=(1, 2, 3))
        if "additive" in families:
            patterns["additive"], norms["additive"] = d.clone(), _rms(d / span)
    return ProxySet(masks=m.clone(), patterns=patterns, norms=norms, lo=lo, hi=hi)


def _rms(d: torch.Tensor) -> torch.Tensor:
    """[T, C, H, W] -> [T] root mean square."""
    return d.pow(2).mean(dim=(1, 2, 3)).add(1e-12).sqrt()


def synthesize_trigger(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, **kw) -> TriggerProxy:
    """The suspect proxy (ProxySet.suspect) of `synthesize_proxies` with the same arguments."""
    return synthesize_proxies(model, x, y, num_classes, **kw).suspect()
