"""The depth rule (onp.md section 6): no oracle. Rank groups by the method's score; among the depths whose CA_B
on D_val stays within `tolerance` of the unpruned model's, take the shallowest whose reward on D_val is within
one standard error of the best (Breiman's one-SE rule), or within a fixed `slack` where one is given. Why this
rule and not a fixed slack: docs/design.md."""
from __future__ import annotations

import torch

from ..metrics import within_tolerance
from ..progress import bar
from ..reward import MaskScorer


def depth_grid(max_depth: int) -> list[int]:
    """0, 1, 2, ... dense at first, then ~10% steps, up to max_depth."""
    out, d = [], 0
    while d <= max_depth:
        out.append(d)
        d = d + 1 if d < 16 else int(d * 1.1) + 1
    if out[-1] != max_depth:
        out.append(max_depth)
    return out


def choose_depth(scores: torch.Tensor, scorer: MaskScorer, *, tolerance: float = 0.02,
                 slack: float | None = None, max_depth: int | None = None, chunk: int = 16,
                 progress: bool = False) -> dict:
    """scores [G] float, higher = prune first; -inf marks a group never to prune (only the n finite ones are
    candidates). Depths are scanned on `depth_grid(max_depth)`, by default up to min(n, max(32, twice the
    candidates above 0.5, n // 10)). slack None: one standard error of the best depth's reward
    (`scorer.standard_error(prune [G] bool) -> float`). Returns {"depth", "prune" [G] bool, "table":
    [{depth, reward, ca_b, ...}], "ca_b_before", "rule", "margin"}; the table is what the report prints.
    progress: a bar of the depths scored on stderr (onp_fast.progress.bar), when they take more than one chunk."""
    order = torch.argsort(scores, descending=True, stable=True)
    g = len(scores)
    n = int(torch.isfinite(scores).sum())
    if max_depth is None:
        max_depth = min(n, max(32, 2 * int((scores > 0.5).sum()), n // 10))
    depths = depth_grid(max_depth)
    masks = torch.zeros(len(depths), g, dtype=torch.bool)
    for i, d in enumerate(depths):
        masks[i, order[:d]] = True
    rows = []
    shown = bar(len(depths), "depth rule", progress and len(depths) > chunk, unit="depth")
    for s in range(0, len(depths), chunk):
        terms = scorer.terms(masks[s:s + chunk])
        rewards = scorer.weights.combine(terms)
        for j in range(len(rewards)):
            rows.append({"depth": depths[s + j], "reward": float(rewards[j]),
                         **{k: float(v[j]) for k, v in terms.items()}})
        shown.update(len(rewards))
    shown.close()
    base = rows[0]["ca_b"]
    allowed = [r for r in rows if within_tolerance(r["ca_b"], base, tolerance) or r["depth"] == 0]
    top = max(allowed, key=lambda r: r["reward"])
    if slack is None:
        margin = scorer.standard_error(masks[depths.index(top["depth"])])
        what = f"one standard error ({margin:.4f})"
    else:
        margin, what = slack, f"{slack}"
    best = min((r for r in allowed if r["reward"] >= top["reward"] - margin - 1e-12), key=lambda r: r["depth"])
    i = depths.index(best["depth"])
    return {"depth": best["depth"], "prune": masks[i], "table": rows, "ca_b_before": base, "margin": margin,
            "rule": f"shallowest depth in {depths[0]}..{depths[-1]} with reward on D_val >= max ({top['reward']:.4f}"
                    f" at depth {top['depth']}) - {what} among those with CA_B >= {base:.4f} - {tolerance}"}
