"""The one entry point: repair() = prepare (shared) -> run(): the method's scores -> the held-out depth rule ->
the pruned copy -> the method's last step -> optional clean fine-tune -> optional compaction -> one report."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..data import stratified_split
from ..defenses import Defense, get
from ..errors import UserError
from ..groups import NeuronGroups, compact
from ..memory import parse_memory, peak_memory
from ..prepare import (FINETUNE_BATCH, UNLEARN_BATCH, DefenseContext, RepairConfig, accuracy_of, check_training_budget,
                       checked_config, finetune_pruned, prepare, summarize, trigger_run)
from ..prepare.context import PURIFY_MODES
from .purify import purify as purify_model
from .scan_plot import picture_data
from .select import choose_depth

KINDS = ("channel", "coupled", "head")


@dataclass
class RepairResult:
    """model: the repaired copy (pruned groups zeroed, then fine-tuned where asked); prune [G] bool; scores [G]
    float (the method's ranking, higher = prune first, -inf = never); groups; report (JSON-able, the same keys
    whatever the method); compact: the model with pruned channels removed (RepairConfig.compact), else None.
    Models and tensors are on the CPU whatever RepairConfig.device ran the repair."""

    model: nn.Module
    prune: torch.Tensor
    scores: torch.Tensor
    groups: NeuronGroups
    report: dict
    compact: nn.Module | None = None


def repair(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, method: str | Defense = "onp",
           config: RepairConfig | None = None, method_config=None, progress: bool = True,
           copy_model: bool = True) -> RepairResult:
    """Repairs a copy of `model` with the clean defense set (x [N, C, H, W] normalised float32, y [N] int64).
    copy_model False: `model` itself becomes the frozen reference the repair reads (one copy of its weights
    less; the caller hands it over and must not use it afterwards).
    method: a name of onp_fast.defenses.METHODS or a Defense; method_config: that method's Config (None: its
    defaults); config: the shared settings. Never sees test data, triggers or attack specs: only (x, y).
    Before any work: UserError for a bad defense set or config, or a training step whose smallest micro-batch
    config.max_memory cannot hold (`training_batches`)."""
    defense = get(method, method_config)  # an unknown method fails before any work
    cfg = checked_config(x, y, num_classes, config).for_model(model)
    check_training_budget(model, x, training_batches(y, cfg, [(defense, purify_mode_of(cfg, defense))]), cfg)
    return run(prepare(model, x, y, num_classes, cfg, progress, copy_model), defense, last=True)


def purify_mode_of(cfg: RepairConfig, defense: Defense, purify: str | None = None, tiled: bool = False) -> str:
    """The purification a run uses: `purify` when given, else cfg.purify, whose "auto" is the method's own
    default (Defense.purify), its sharpness-aware step dropped ("sam+proxy" -> "proxy") when `tiled` (the
    context has tile proxies: a ViT; why: docs/design.md, "Refitting the tile proxies")."""
    mode = purify or cfg.purify
    if mode != "auto":
        return mode
    return "proxy" if tiled and defense.purify == "sam+proxy" else defense.purify


def training_batches(y: torch.Tensor, cfg: RepairConfig, runs) -> dict[str, tuple[int, int | None]]:
    """{what: (images of one step, the fewest images a micro-batch of it may hold; None: a training-mode step's,
    `memory.train_mode_min`)} of every training step with
    a batch its algorithm fixes (one SGD step per batch) that `prepare` and then `run` of each (Defense,
    purification mode) of `runs` take on the defense set with labels y [N] under cfg (checked): prepare's
    unlearning on D_opt, the method's own
    (`Defense.train_batch`), purification on D_opt (with a proxy-stamped copy of each image when the mode
    unlearns proxies and prepare makes them), the clean fine-tune on all N. What `check_training_budget` checks
    before any work. Unlearning, purification and the fine-tunes (`unlearn`, `finetune_pruned`) run a step the
    memory budget cannot hold whole as micro-batches with its gradient accumulated, so only a budget under a
    step's smallest micro-batch (1 image for unlearning, in eval mode; in training mode 2 with BatchNorm, else 1)
    is an error
    (`memory.micro_batch`); a method's own steps that go through neither (ANP's and RNP's mask optimisation:
    `Defense.splits_training` False) are kept whole."""
    n = len(y)
    n_opt = len(stratified_split(y.cpu(), cfg.val_fraction, cfg.seed)[0])
    proxies = bool(cfg.weights.ca_t) or cfg.purify != "none"  # when prepare synthesises them
    out = {"unlearning": (min(UNLEARN_BATCH, n_opt), 1)}
    for defense, mode in runs:
        if defense.train_batch():
            b = defense.train_batch()
            out[f"{defense.name}'s training"] = (b, None if defense.splits_training else b)
        if mode != "none":
            out[f"purification ({mode})"] = (min(FINETUNE_BATCH, n_opt) * (2 if "proxy" in mode and proxies else 1),
                                             None)
    if cfg.finetune_epochs > 0:
        out["fine-tuning"] = (min(FINETUNE_BATCH, n), None)
    return out


def memory_part(cfg: RepairConfig) -> dict:
    """The report's "peak_memory": the process's peak so far (`memory.peak_memory`: "rss_bytes", and
    "cuda_max_allocated_bytes" on CUDA, else None), the device, the budget as given and in bytes, and the
    activations' share of it (`RepairConfig.activation_memory`)."""
    return {**peak_memory(cfg.device), "device": str(cfg.device), "max_memory": cfg.max_memory,
            "max_memory_bytes": None if cfg.max_memory is None else parse_memory(cfg.max_memory),
            "activation_bytes": cfg.activation_memory}


def run(ctx: DefenseContext, method: str | Defense = "onp", method_config=None, *, purify: str | None = None,
        ranked: RepairResult | None = None, last: bool = False) -> RepairResult:
    """One defense on a prepared context (left unchanged, so `compare` shares one context among methods), on its
    device (ctx.cfg.device); the result comes back on the CPU.
    purify: overrides the purification mode (`purify_mode_of`). ranked: an earlier result of the same method on
    this context whose scores are taken instead of scoring again (compare's "onp/none" row). last: no later run
    shares ctx, so the unlearned copy, which only the ranking and the depth rule read, is dropped from it once
    the method's own step after the cut is done (ctx.unlearned None): one copy of the weights less at
    purification's peak (docs/design.md, "Large models").
    report["method_times_s"]: this method's own phases; report["scoring_times_s"]: those of its ranking (taken
    from `ranked` when given); report["times_s"]: the shared ones and this method's; report["peak_memory"]:
    `memory_part` at the end of the run."""
    defense = get(method, method_config)
    mode = purify_mode_of(ctx.cfg, defense, purify,
                          tiled=ctx.proxies is not None and ctx.proxies.tile_masks is not None)
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
        scores = scores.detach().float().cpu()
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
        prune = choice["prune"].cpu()
        with ctx.phase("apply"):
            repaired = ctx.groups.pruned_copy(ctx.model, prune)
        details.update(defense.after(ctx, repaired, prune))
        if last:
            ctx.unlearned = None
        purified = None
        if mode != "none":
            with ctx.phase("purify"):
                purified = purify_model(ctx, repaired, prune, choice["ca_b_before"], mode)
        if ctx.cfg.finetune_epochs > 0:
            with ctx.phase("finetune"):
                finetune_pruned(repaired, ctx.groups, prune, *ctx.defense_set(), epochs=ctx.cfg.finetune_epochs,
                                seed=ctx.cfg.seed, progress=ctx.progress, max_memory=ctx.cfg.activation_memory)
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
        small = small.cpu()
    report["peak_memory"] = memory_part(ctx.cfg)
    return RepairResult(model=repaired.cpu(), prune=prune, scores=scores, groups=ctx.groups, report=report,
                        compact=small)


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
    ca = accuracy_of(ctx.model, ctx.x_val, ctx.y_val, max_memory=ctx.cfg.activation_memory)
    return {"depth": 0, "prune": torch.zeros(ctx.groups.num_groups, dtype=torch.bool), "table": [],
            "ca_b_before": ca, "margin": 0.0, "rule": "none: the method prunes nothing"}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def proxy_part(ctx: DefenseContext) -> dict | None:
    """What the shared trigger scan of a prepared context found (None when no proxies were synthesised): the
    suspect's "target", "family", "anomaly_index", whether it was "flagged" (it steers the reward), per
    family the anomaly index and each class's proxy norm, and the optimisation that ran ("setting": steps,
    images per class per step, Adam rate). The report's trigger_proxy part without its scan
    picture; `compare` reports it once for every method."""
    proxy = ctx.proxy
    if proxy is None:
        return None
    return {"target": proxy.target, "family": proxy.family, "anomaly_index": round(proxy.anomaly_index, 3),
            "flagged": ctx.trigger is not None,
            "anomaly_per_family": {f: round(v, 3) for f, v in ctx.proxies.anomaly().items()},
            "norms_per_family": {f: [round(float(v), 4) for v in n] for f, n in ctx.proxies.norms.items()},
            "setting": trigger_run(ctx.cfg, ctx.x_opt.shape)}


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
        "trigger_proxy": None if proxy is None else {**proxy_part(ctx), **_scan_parts(ctx)},
        "details": details,
        "stopping_rule": {"rule": choice["rule"], "depth": choice["depth"], "margin": choice["margin"],
                          "table": choice["table"]},
        "ca_val_before": choice["ca_b_before"],
        "ca_val_after": accuracy_of(repaired, ctx.x_val, ctx.y_val, max_memory=ctx.cfg.activation_memory),
        "pruned_groups": int(choice["prune"].sum()),
        "pruned_per_layer": pruned_per_layer,
        "layer_sizes": {n: int(len(groups.layer_groups[n])) for n in groups.layers},
        "finetune_epochs": ctx.cfg.finetune_epochs,
        "compact": None,
        "method_times_s": dict(own_times),
        "times_s": {**ctx.times, **own_times},
    }
