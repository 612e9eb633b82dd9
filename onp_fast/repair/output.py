"""What repair writes: the masks as JSON, the report as JSON, the plot as PNG, the trigger-proxy picture as PNG
(write_trigger_png, from scan_plot: the picture `onp-fast scan --image` draws) — all atomically."""
from __future__ import annotations

import json

import torch

from ..atomic import atomic_path, write_text
from ..groups import NeuronGroups
from .scan_plot import write_trigger_png

__all__ = ["masks_json", "write_json", "write_plot", "write_trigger_png"]


def masks_json(groups: NeuronGroups, prune: torch.Tensor) -> dict:
    """prune [G] bool -> {"pruned": [{"group", "kind", "rows": [[layer, channel]...], "points": [[module,
    site, channel]...]}], "num_groups", "num_pruned"}."""
    pruned = []
    for gi in torch.nonzero(prune).flatten().tolist():
        g = groups.groups[gi]
        pruned.append({"group": gi, "kind": g.kind, "rows": [[n, r] for n, r in g.rows],
                       "points": [[p.module, p.site, p.channel] for p in g.points]})
    return {"num_groups": groups.num_groups, "num_pruned": len(pruned), "pruned": pruned}


def write_json(path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def write_plot(path, report: dict) -> None:
    """plot_figure(report), written as PNG atomically."""
    import matplotlib.pyplot as plt

    fig = plot_figure(report)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_figure(report: dict):
    """Two panels: the RL reward curve (mean and best of each iteration's K masks; for a method without RL, the
    depth rule's reward on D_val per depth; integer ticks) and the pruned fraction per layer (every layer named,
    none clipped). -> the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.6))
    curve = report["details"].get("reward_curve")
    if curve:
        a.plot(curve["mean"], label="mean reward")
        a.plot(curve["max"], label="best mask", alpha=0.7)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.set_xlabel("RL iteration")
        a.set_ylabel("reward on D_opt")
        a.set_title("policy training")
    else:
        table = report["stopping_rule"]["table"]
        a.plot([r["depth"] for r in table], [r["reward"] for r in table], marker=".", label="reward")
        a.plot([r["depth"] for r in table], [r["ca_b"] for r in table], marker=".", label="CA_B")
        a.axvline(report["stopping_rule"]["depth"], color="k", lw=0.8, label="chosen depth")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.set_xlabel("pruning depth (groups)")
        a.set_ylabel("on held-out D_val")
        a.set_title(f"depth rule ({report.get('method', '')})")
    a.legend()
    layers = report["layer_sizes"]
    names = list(layers)
    frac = [report["pruned_per_layer"].get(n, 0) / max(1, layers[n]) for n in names]
    b.bar(range(len(names)), frac)
    b.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    b.set_ylabel("pruned fraction")
    n = report["pruned_groups"]
    b.set_title(f"pruned per layer ({n} group{'' if n == 1 else 's'})")
    fig.tight_layout()  # makes room for the rotated layer names, so none is clipped
    return fig
