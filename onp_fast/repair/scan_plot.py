"""The trigger-proxy picture shared by `onp-fast scan --image` and repair's OUT.trigger.png: per family a row
with the recovered trigger of the shown class, clean example images and the same images stamped with that
proxy (all in pixel space), and a bar chart of every class's anomaly index with the gate line. Written
atomically (matplotlib Agg).

The shown class is the flagged one, else the class with the most anomalous proxy (summarize's "suspect").
Repair's report carries what the picture needs as JSON (`picture_data` in its trigger_proxy part), so
`write_trigger_png` draws the same picture from a report without the ProxySet.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..atomic import atomic_path
from ..prepare import ProxySet, TriggerProxy

EXAMPLES = 4  # clean images shown per family, each also stamped
PICTURE_MAX_VALUES = 3 * 64 * 64  # largest C*H*W whose proxies a report carries (a report stays small)


def shown_class(result: dict) -> int:
    """The class the picture shows: the flagged class, else the most anomalous proxy's (they coincide when
    flagged: the flagged class is the suspect)."""
    return int(result["suspect"]["target"])


def shown_proxies(result: dict, proxies: ProxySet) -> dict[str, TriggerProxy]:
    """{family: the shown class's proxy in that family}, in the families' order."""
    t = shown_class(result)
    return {f: proxies.proxy(f, t) for f in proxies.patterns}


def picture_data(result: dict, proxies: ProxySet) -> dict | None:
    """What `write_trigger_png` needs beyond `summarize`'s dict, JSON-able: {"lo": [C], "hi": [C], "proxies":
    {family: {"mask": [1, H, W] nested list or None, "pattern": [C, H, W] nested list}}} of the shown class
    (values rounded to 4 decimals); None for inputs over PICTURE_MAX_VALUES values (C*H*W)."""
    if proxies.patterns[next(iter(proxies.patterns))][0].numel() > PICTURE_MAX_VALUES:
        return None

    def plain(t: torch.Tensor | None):
        return None if t is None else t.detach().float().mul(1e4).round().div(1e4).tolist()

    return {"lo": plain(proxies.lo.flatten()), "hi": plain(proxies.hi.flatten()),
            "proxies": {f: {"mask": plain(p.mask), "pattern": plain(p.pattern)}
                        for f, p in shown_proxies(result, proxies).items()}}


def _proxies_from_data(result: dict, data: dict) -> dict[str, TriggerProxy]:
    """picture_data's JSON -> {family: TriggerProxy} of the shown class (norms and anomaly index from result)."""
    lo, hi = (torch.tensor(data[k]).view(1, -1, 1, 1) for k in ("lo", "hi"))
    t = shown_class(result)
    row = list(result.get("classes", range(t + 1))).index(t)
    out = {}
    for f, d in data["proxies"].items():
        fam = result["families"][f]
        out[f] = TriggerProxy(mask=None if d["mask"] is None else torch.tensor(d["mask"]),
                              pattern=torch.tensor(d["pattern"]), target=t, norms=torch.tensor(fam["norms"]),
                              anomaly_index=float(fam["z_scores"][row]), family=f, lo=lo, hi=hi,
                              strength=float(fam["norms"][row]) if f == "blend" else None)
    return out


def pick_examples(x: torch.Tensor, y: torch.Tensor, avoid: int, k: int = EXAMPLES) -> torch.Tensor:
    """x [N, C, H, W], y [N] -> up to k images [k', C, H, W] whose label is not `avoid`, from as many different
    classes as possible (the first image of each class in turn, in x's order)."""
    order = []
    for c in torch.unique(y).tolist():
        if c != avoid:
            order.append(torch.nonzero(y == c).flatten())
    picked, i = [], 0
    while len(picked) < k and any(i < len(o) for o in order):
        picked += [int(o[i]) for o in order if i < len(o)][: k - len(picked)]
        i += 1
    return x[picked]


def verdict(result: dict, digits: int = 2) -> str:
    """A scan result's verdict in one line (`onp-fast scan`'s last line; the picture's title with digits=1)."""
    if result["flagged"]:
        return (f"backdoor suspected: class {result['target']} (family {result['family']}, anomaly index "
                f"{result['anomaly_index']:.{digits}f} >= gate {result['gate']:g})")
    return (f"no class stands out (largest anomaly index {result['suspect']['anomaly_index']:.{digits}f} < gate "
            f"{result['gate']:g})")


def write_scan_png(path, scan_result: dict, proxies: ProxySet, x_examples: torch.Tensor,
                   mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor) -> None:
    """The picture of `scan_result` (summarize's / scan's dict) and the ProxySet it summarises. x_examples
    [k, C, H, W]: normalised clean images (pick_examples), shown de-normalised with mean/std [C], plain and
    stamped with each family's proxy of the shown class."""
    _draw(path, scan_result, shown_proxies(scan_result, proxies), x_examples, mean, std)


def write_trigger_png(path, report: dict, x: torch.Tensor, y: torch.Tensor, mean: Sequence[float] | torch.Tensor,
                      std: Sequence[float] | torch.Tensor) -> bool:
    """Repair's OUT.trigger.png: the scan picture from the report's trigger_proxy part (its "scan" and
    "picture"), with examples picked from the defense images x [N, C, H, W] (normalised), y [N]. The trigger
    rows are left out where the report carries no picture data (large inputs). False (nothing written) when
    the report has no trigger proxy (repair did not synthesise one)."""
    part = report.get("trigger_proxy")
    if not part:
        return False
    result = part["scan"]
    shown = _proxies_from_data(result, part["picture"]) if part.get("picture") else {}
    _draw(path, result, shown, pick_examples(x, y, shown_class(result)), mean, std)
    return True


def _pixels(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised [k, C, H, W] -> pixels in [0, 1] [k, C, H, W]."""
    m, s = (torch.as_tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (mean, std))
    return (x * s + m).clamp(0, 1)


def _trigger_image(p: TriggerProxy, mean, std) -> tuple[torch.Tensor, str]:
    """The visible trigger [C, H, W] in [0, 1] and its caption: patch: mask * pattern (in pixels) on black;
    warp: how far each pixel is moved [1, H, W], white the largest; the others: the delta in pixels, scaled so
    its largest value is 0.5 around mid grey."""
    if p.family == "patch":
        return p.mask * _pixels(p.pattern.unsqueeze(0), mean, std)[0], f"mask x pattern\n(mask L1 {p.mask.sum():.1f})"
    if p.family == "warp":
        shift = p.pattern.pow(2).sum(0, keepdim=True).sqrt()  # [1, H, W] pixels each pixel is moved by
        peak = float(shift.max()) or 1.0
        return shift / peak, f"shift, white {peak:.2f} px\n(RMS {float(p.pattern.pow(2).mean().sqrt()):.2f} px)"
    delta = p.pattern * torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    peak = float(delta.abs().max()) or 1.0
    return (0.5 + 0.5 * delta / peak).clamp(0, 1), f"delta x{0.5 / peak:.1f}\n(+- {peak:.2f} of pixel range)"


def _show(ax, img: torch.Tensor, title: str = "") -> None:
    """img [C, H, W] in [0, 1] on ax (grey for one channel)."""
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def _draw(path, result: dict, shown: dict[str, TriggerProxy], x: torch.Tensor, mean, std) -> None:
    """One row per family in `shown` (its trigger, the k clean images, the k stamped ones), then the bar chart
    of result["families"][f]["z_scores"] per class with the gate line; verdict() on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, t = len(x), shown_class(result)
    cols = 1 + 2 * k
    fig = plt.figure(figsize=(max(8.0, 1.3 * cols), 1.7 * len(shown) + 3.2))
    grid = fig.add_gridspec(len(shown) + 1, cols, height_ratios=[1.0] * len(shown) + [1.6])
    clean = _pixels(x, mean, std)
    for row, (f, p) in enumerate(shown.items()):
        img, caption = _trigger_image(p, mean, std)
        _show(fig.add_subplot(grid[row, 0]), img, f"{f}: class {t} proxy\n{caption}")
        with torch.no_grad():
            stamped = _pixels(p.apply(x), mean, std)
        for i in range(k):
            _show(fig.add_subplot(grid[row, 1 + i]), clean[i], "clean" if i == 0 else "")
            _show(fig.add_subplot(grid[row, 1 + k + i]), stamped[i], "stamped" if i == 0 else "")
    bars = fig.add_subplot(grid[len(shown), :])
    fams = list(result["families"])
    n = len(result["families"][fams[0]]["z_scores"])
    classes = result.get("classes", list(range(n)))
    width = 0.8 / len(fams)
    for j, f in enumerate(fams):
        bars.bar([c - 0.4 + width * (j + 0.5) for c in range(n)], result["families"][f]["z_scores"], width,
                 label=f"{f} (largest {result['families'][f]['anomaly_index']:.1f})")
    bars.axhline(result["gate"], color="r", ls="--", lw=1, label=f"gate {result['gate']:g}")
    bars.axhline(0, color="k", lw=0.5)
    bars.set_xticks(range(n), [str(c) for c in classes])
    bars.set_xlabel("class" if len(classes) == n and classes == list(range(n)) else "class (the screened ones)")
    bars.set_ylabel("anomaly index (MAD units)")
    bars.set_title("how far each class's trigger proxy is smaller than the median (above the gate: flagged)",
                   fontsize=9)
    bars.legend(fontsize=7)
    fig.suptitle(verdict(result, digits=1), fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
