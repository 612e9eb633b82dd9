"""The one entry point: repair() = prepare (shared) -> run(): the method's scores -> the held-out depth rule ->
the pruned copy -> the method's last step -> optional clean fine-tune -> optional compaction -> one report."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..defenses import Defense, get
from ..errors import UserError
from ..groups import NeuronGroups, compact
from ..prepare import DefenseContext, RepairConfig, accuracy_of, finetune_pruned, prepare, summarize
from ..prepare.context import PURIFY_MODES
from .purify import purify as purify_model
from .scan_plot import picture_data
from .select import choose_depth

KINDS = ("channel", "coupled", "head")


@dataclass
class RepairResult:
    """model: the repaired copy (pruned groups zeroed, then fine-tuned where asked); prune [G] bool; scores [G]
    float (the method's ranking, higher = prune first, -inf = never); groups; report (JSON-able, the same keys
    whatever the method); compact: the model with pruned channels removed (RepairConfig.compact), else None."""

    model: nn.Module
    prune: torch.Tensor
    scores: torch.Tensor
    groups: NeuronGroups
    report: dict
    compact: nn.Module | None = None


def repair(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, method: str | Defense = "onp",
           config: RepairConfig | None = None, method_config=None, progress: bool = True) -> RepairResult:
    """Repairs a copy of `model` with the clean defense set (x [N, C, H, W] normalised float32, y [N] int64).
    method: a name of onp_fast.defenses.METHODS or a Defense; method_config: that method's Config (None: its
    defaults); config: the shared settings. Never sees test data, triggers or attack specs: only (x, y)."""
    defense = get(method, method_config)  # an unknown method fails before any work
    return run(prepare(model, x, y, num_classes, config, progress), defense)


def purify_mode(ctx: DefenseContext, defense: Defense, purify: str | None = None) -> str:
    """The purification a run uses: `purify` when given, else RepairConfig.purify, whose "auto" is the method's
    own default (Defense.purify)."""
    mode = purify or ctx.cfg.purify
    return defense.purify if mode == "auto" else mode


def run(ctx: DefenseContext, method: str | Defense = "onp", method_config=None, *, purify: str | None = None,
        ranked: RepairResult | None = None) -> RepairResult:
    """One defense on a prepared context (left unchanged, so `compare` shares one context among methods).
    purify: overrides the purification mode (`purify_mode`). ranked: an earlier result of the same method on
    this context whose scores are taken instead of scoring again (compare's "onp/none" row).
    report["method_times_s"]: this method's own phases; report["scoring_times_s"]: those of its ranking (taken
    from `ranked` when given); report["times_s"]: the shared ones and this method's."""
    defense = get(method, method_config)
    mode = purify_mode(ctx, defense, purify)
    if mode not in PURIFY_MODES or mode == "auto":
        raise UserError(f"unknown purification {mode!r}: use one of {', '.join(PURIFY_MODES)}")
    with ctx.own_times() as own:
        torch.manual_seed(ctx.cfg.seed)  # each method starts from the same RNG state, whatever ran before
        if ranked is None:
            scores, details = defense.scores(ctx)
        else:
            scores, details = ranked.scores, copy.deepcopy(ranked.report["details"])
            own.update(ranked.report["scoring_times_s"])
        scoring = dict(own)  # the phases of the ranking, shared with a later run that takes it (`ranked`)
        scores = scores.detach().float()
        if scores.shape != (ctx.groups.num_groups,) or torch.isnan(scores).any():
            raise UserError(f"{defense.name} returned scores of shape {list(scores.shape)} (or NaN); "
                            f"expected [{ctx.groups.num_groups}] numbers")
        if not defense.prunes:
            choice = _no_pruning(ctx)
        elif not bool(torch.isfinite(scores).any()):
            raise UserError(f"{defense.name} found no neuron group it can score in this model")
        else:
            with ctx.phase("select"), torch.no_grad():
                choice = choose_depth(scores, ctx.scorer("val"), tolerance=ctx.cfg.tolerance, slack=ctx.cfg.slack,
                                      progress=ctx.progress)
        prune = choice["prune"]
        with ctx.phase("apply"):
            repaired = ctx.groups.pruned_copy(ctx.model, prune)
        details.update(defense.after(ctx, repaired, prune))
        purified = None
        if mode != "none":
            with ctx.phase("purify"):
                purified = purify_model(ctx, repaired, prune, choice["ca_b_before"], mode)
        if ctx.cfg.finetune_epochs > 0:
            with ctx.phase("finetune"):
                finetune_pruned(repaired, ctx.groups, prune, *ctx.defense_set(), epochs=ctx.cfg.finetune_epochs,
                                seed=ctx.cfg.seed, progress=ctx.progress)
        small = None
        if ctx.cfg.compact:
            with ctx.phase("compact"):
                small, diff = compacted(repaired, ctx.groups, prune, ctx.defense_set()[0][:64])
    report = _report(ctx, defense, scores, choice, repaired, details, own)
    report["scoring_times_s"] = scoring
    report["purify"] = purified if purified is not None else {"mode": "none"}
    if small is not None:
        report["compact"] = {"parameters_before": _params(repaired), "parameters_after": _params(small),
                             "max_abs_diff": diff}
    return RepairResult(model=repaired, prune=prune, scores=scores, groups=ctx.groups, report=report, compact=small)


@torch.no_grad()
def compacted(model: nn.Module, groups: NeuronGroups, prune: torch.Tensor, x: torch.Tensor
              ) -> tuple[nn.Module, float]:
    """-> (`compact(model, groups, prune)`, its largest output difference from the masked model on x), checked:
    UserError when they differ by more than 1e-5."""
    small = compact(model, groups, prune).eval()
    ref, out = model(x), small(x)
    diff = float((out - ref).abs().max())
    if not torch.allclose(out, ref, rtol=1e-5, atol=1e-5):
        raise UserError(f"compaction: the compact model differs from the masked model by {diff:.2e}")
    return small, diff


def _no_pruning(ctx: DefenseContext) -> dict:
    """The depth rule's answer for a method that prunes nothing (fine-tuning defenses): depth 0."""
    ca = accuracy_of(ctx.model, ctx.x_val, ctx.y_val)
    return {"depth": 0, "prune": torch.zeros(ctx.groups.num_groups, dtype=torch.bool), "table": [],
            "ca_b_before": ca, "margin": 0.0, "rule": "none: the method prunes nothing"}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _scan_parts(ctx: DefenseContext) -> dict:
    """The trigger_proxy part's "scan" (what `onp-fast scan` reports for these proxies) and "picture" (what
    OUT.trigger.png draws: scan_plot.picture_data)."""
    result = summarize(ctx.proxies, ctx.cfg.anomaly_threshold)
    return {"scan": result, "picture": picture_data(result, ctx.proxies)}


def _report(ctx: DefenseContext, defense: Defense, scores: torch.Tensor, choice: dict, repaired: nn.Module,
            details: dict, own_times: dict) -> dict:
    groups, proxy = ctx.groups, ctx.proxy
    pruned_per_layer: dict[str, int] = {}
    for gi in torch.nonzero(choice["prune"]).flatten().tolist():
        for name, _ in groups.groups[gi].rows:
            pruned_per_layer[name] = pruned_per_layer.get(name, 0) + 1
    return {
        "method": defense.name,
        "method_config": defense.config_dict(),
        "config": ctx.cfg.to_dict(),
        "defense": {"n": len(ctx.x_opt) + len(ctx.x_val), "n_opt": len(ctx.x_opt), "n_val": len(ctx.x_val),
                    "tolerance": ctx.cfg.tolerance},
        "groups": {"count": groups.num_groups, "layers": len(groups.layers),
                   "kinds": {k: sum(g.kind == k for g in groups.groups) for k in KINDS}},
        "candidates": int(torch.isfinite(scores).sum()),
        "unlearn": ctx.unlearn_info,
        "trigger_proxy": None if proxy is None else {
            "target": proxy.target, "family": proxy.family, "anomaly_index": round(proxy.anomaly_index, 3),
            "flagged": ctx.trigger is not None,
            "anomaly_per_family": {f: round(v, 3) for f, v in ctx.proxies.anomaly().items()},
            "norms_per_family": {f: [round(float(v), 4) for v in n] for f, n in ctx.proxies.norms.items()},
            **_scan_parts(ctx)},
        "details": details,
        "stopping_rule": {"rule": choice["rule"], "depth": choice["depth"], "margin": choice["margin"],
                          "table": choice["table"]},
        "ca_val_before": choice["ca_b_before"],
        "ca_val_after": accuracy_of(repaired, ctx.x_val, ctx.y_val),
        "pruned_groups": int(choice["prune"].sum()),
        "pruned_per_layer": pruned_per_layer,
        "layer_sizes": {n: int(len(groups.layer_groups[n])) for n in groups.layers},
        "finetune_epochs": ctx.cfg.finetune_epochs,
        "compact": None,
        "method_times_s": dict(own_times),
        "times_s": {**ctx.times, **own_times},
    }
