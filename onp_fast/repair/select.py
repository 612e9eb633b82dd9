"""The stopping rule (onp.md section 6): no oracle. Rank groups by the trained policy's prune probability; among
the depths whose CA_B on D_val stays within `tolerance` of the unpruned model's, take the shallowest whose
reward on D_val is within one standard error of the best (Breiman's one-SE rule: the most parsimonious choice
the finite D_val cannot tell from the best), or within a fixed `slack` where one is given. Parsimony matters:
past the depth that disables the backdoor the proxy term CA_T keeps creeping up by thousandths while clean
accuracy erodes on images that the small D_val does not resolve (on our Blended digits model: reward +0.0006
from depth 15 to 40, D_val CA_B flat at 100%, test CA -3 points). A fixed slack of 0.02 stopped too early
where CA_T saturates close to 1 with little spread (WaNet digits: depth 5 at D_val reward 1.976 vs best 1.991,
test ASR 5.6%): the standard error scales the margin to how noisy the estimate is (the same model then stops at
9 groups, SE 0.0045, test ASR 0.6%)."""
from __future__ import annotations

import torch

from .reward import MaskScorer


def depth_grid(max_depth: int) -> list[int]:
    """0, 1, 2, ... dense at first, then ~10% steps, up to max_depth."""
    out, d = [], 0
    while d <= max_depth:
        out.append(d)
        d = d + 1 if d < 16 else int(d * 1.1) + 1
    if out[-1] != max_depth:
        out.append(max_depth)
    return out


def choose_depth(prune_prob: torch.Tensor, scorer: MaskScorer, *, tolerance: float = 0.02,
                 slack: float | None = None, max_depth: int | None = None, chunk: int = 16) -> dict:
    """prune_prob [G] float. slack None: one standard error of the best depth's reward
    (`scorer.standard_error(prune [G] bool) -> float`). Returns {"depth", "prune" [G] bool, "table":
    [{depth, reward, ca_b, ...}], "ca_b_before", "rule", "margin"}; the table is what the report prints."""
    order = torch.argsort(prune_prob, descending=True, stable=True)
    g = len(prune_prob)
    if max_depth is None:
        max_depth = min(g, max(32, 2 * int((prune_prob > 0.5).sum()), g // 10))
    depths = depth_grid(max_depth)
    masks = torch.zeros(len(depths), g, dtype=torch.bool)
    for i, d in enumerate(depths):
        masks[i, order[:d]] = True
    rows = []
    for s in range(0, len(depths), chunk):
        terms = scorer.terms(masks[s:s + chunk])
        rewards = scorer.weights.combine(terms)
        for j in range(len(rewards)):
            rows.append({"depth": depths[s + j], "reward": float(rewards[j]),
                         **{k: float(v[j]) for k, v in terms.items()}})
    base = rows[0]["ca_b"]
    allowed = [r for r in rows if r["ca_b"] >= base - tolerance - 1e-12]
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
