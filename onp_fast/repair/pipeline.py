"""repair(): the whole ONP pipeline on a model and a clean defense set, phase by phase, timed."""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import UserError
from ..features import FEATURE_NAMES, accuracy_of, exposure_features, unlearn
from ..graph import build_policy_graph
from ..groups import NeuronGroups, find_groups
from ..policy import PPOConfig, PrunePolicy, train_policy
from .perturb import adversarial_perturbations
from .reward import MaskScorer, RewardWeights
from .trigger import synthesize_trigger
from .select import choose_depth


@dataclass
class RepairConfig:
    iterations: int = 60
    samples: int = 16
    seed: int = 0
    algorithm: str = "ppo"
    conv: str = "sage"
    weights: RewardWeights = field(default_factory=RewardWeights)
    tolerance: float = 0.02  # CA_B drop allowed on D_val by the depth rule
    slack: float | None = None  # depth rule margin below the best D_val reward; None: one standard error
    val_fraction: float = 0.2
    reward_batch: int = 128  # images of D_opt scored per iteration (a fixed seeded subset)
    graph_eps: float = 0.9
    cross_layer_topk: int = 2
    perturbations: int = 2
    perturb_eps: float = 0.4
    unlearn_lr: float = 0.01
    init_prune_prob: float = 0.02
    anomaly_threshold: float = 2.0  # the trigger proxy drives CA_T only when its class stands out this far (MAD)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weights"] = self.weights.to_dict()
        return d


@dataclass
class RepairResult:
    """model: the repaired copy (pruned weights zeroed); prune [G] bool; prune_prob [G] float (the trained
    policy's); groups; report (JSON-able dict)."""

    model: nn.Module
    prune: torch.Tensor
    prune_prob: torch.Tensor
    groups: NeuronGroups
    report: dict


def stratified_split(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """y [N] -> (idx_opt, idx_val) int64: `fraction` of every class to val (at least one where a class has 2+)."""
    g = torch.Generator().manual_seed(seed)
    opt, val = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = int(round(len(idx) * fraction))
        if len(idx) >= 2:
            n_val = max(1, n_val)
        val.append(idx[:n_val])
        opt.append(idx[n_val:])
    return torch.cat(opt).sort().values, torch.cat(val).sort().values


@dataclass
class DefenseContext:
    """What every pruning defense shares on one model and defense set (so ONP and the baselines see the same
    data, split and depth rule): the split D_opt / D_val, the neuron groups, the unlearned copy, the trigger
    proxy and the adversarial perturbations (None where their reward weight is 0), the D_opt reward subset."""

    model: nn.Module
    num_classes: int
    cfg: RepairConfig
    x_opt: torch.Tensor
    y_opt: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    groups: NeuronGroups
    unlearned: nn.Module
    unlearn_info: dict
    trigger: object
    perturbations: torch.Tensor | None
    times: dict
    progress: bool = True
    proxy: object = None  # the synthesised trigger proxy, flagged or not (`trigger` is it when flagged, else None)

    def phase(self, name: str) -> "_Phase":
        return _Phase(name, self.times, self.progress)

    def scorer(self, on: str = "opt") -> MaskScorer:
        """The reward of onp.md section 5 on the fixed D_opt subset (on="opt") or on all of D_val (on="val")."""
        if on == "val":
            x, y = self.x_val, self.y_val
        else:
            gen = torch.Generator().manual_seed(self.cfg.seed)
            sub = torch.randperm(len(self.x_opt), generator=gen)[: self.cfg.reward_batch]
            x, y = self.x_opt[sub], self.y_opt[sub]
        return MaskScorer(self.groups, self.model, x, y, self.cfg.weights, self.unlearned, self.perturbations,
                          self.trigger)


def check_defense_set(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
    if len(x) == 0:
        raise UserError("the defense set is empty")
    if len(x) < num_classes:
        raise UserError(f"the defense set has {len(x)} images, fewer than the {num_classes} classes")
    if y.min() < 0 or y.max() >= num_classes:
        raise UserError(f"defense labels must lie in [0, {num_classes - 1}]")


def prepare(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: RepairConfig | None = None,
            progress: bool = True) -> DefenseContext:
    """Split, groups, unlearning, trigger proxy and perturbations on a frozen copy of `model`, timed per phase.
    x [N, C, H, W] normalised float32, y [N] int64: the clean defense set, the only data a defense sees."""
    cfg = cfg or RepairConfig()
    check_defense_set(x, y, num_classes)
    torch.manual_seed(cfg.seed)
    times: dict[str, float] = {}
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with _Phase("split", times, progress):
        i_opt, i_val = stratified_split(y, cfg.val_fraction, cfg.seed)
        x_opt, y_opt, x_val, y_val = x[i_opt], y[i_opt], x[i_val], y[i_val]
    with _Phase("groups", times, progress):
        groups = find_groups(model, tuple(x.shape[1:]))
    with _Phase("unlearn", times, progress):
        unlearned, unlearn_info = unlearn(model, x_opt, y_opt, lr=cfg.unlearn_lr, seed=cfg.seed)
    with _Phase("trigger", times, progress):
        proxy = synthesize_trigger(model, x_opt, y_opt, num_classes, seed=cfg.seed) if cfg.weights.ca_t else None
    # Neural Cleanse's rule: no class with a mask anomalously small (anomaly index < 2) -> no trigger flagged, and
    # a proxy that is then only an adversarial patch of some class must not steer the pruning.
    trigger = proxy if proxy is not None and proxy.anomaly_index >= cfg.anomaly_threshold else None
    with _Phase("perturbations", times, progress):
        perts = adversarial_perturbations(model, groups, x_opt, y_opt, count=cfg.perturbations,
                                          eps=cfg.perturb_eps, seed=cfg.seed) if cfg.weights.ca_p else None
    return DefenseContext(model, num_classes, cfg, x_opt, y_opt, x_val, y_val, groups, unlearned, unlearn_info,
                          trigger, perts, times, progress, proxy)


def finish(ctx: DefenseContext, scores: torch.Tensor, report: dict | None = None) -> RepairResult:
    """The stopping rule (select.py) over the ranking `scores` [G] float (higher = prune first) on D_val, then the
    pruned copy of the model and the report (common part + `report`)."""
    with ctx.phase("select"), torch.no_grad():
        choice = choose_depth(scores, ctx.scorer("val"), tolerance=ctx.cfg.tolerance, slack=ctx.cfg.slack)
    with ctx.phase("apply"):
        repaired = ctx.groups.prune_(copy.deepcopy(ctx.model), ~choice["prune"])
        ca_val_after = accuracy_of(repaired, ctx.x_val, ctx.y_val)
    groups = ctx.groups
    pruned_per_layer = {}
    for gi in torch.nonzero(choice["prune"]).flatten().tolist():
        for name, _ in groups.groups[gi].rows:
            pruned_per_layer[name] = pruned_per_layer.get(name, 0) + 1
    proxy = ctx.proxy
    out = {
        "config": ctx.cfg.to_dict(),
        "defense": {"n": len(ctx.x_opt) + len(ctx.x_val), "n_opt": len(ctx.x_opt), "n_val": len(ctx.x_val)},
        "groups": {"count": groups.num_groups, "layers": len(groups.layers),
                   "kinds": {k: sum(g.kind == k for g in groups.groups) for k in ("channel", "coupled", "head")}},
        "unlearn": ctx.unlearn_info,
        "trigger_proxy": None if proxy is None else {
            "target": proxy.target, "anomaly_index": round(proxy.anomaly_index, 3),
            "flagged": ctx.trigger is not None, "mask_l1_per_class": [round(float(v), 3) for v in proxy.norms]},
        **(report or {}),
        "stopping_rule": {"rule": choice["rule"], "depth": choice["depth"], "margin": choice["margin"],
                          "table": choice["table"]},
        "ca_val_before": choice["ca_b_before"],
        "ca_val_after": ca_val_after,
        "pruned_groups": int(choice["prune"].sum()),
        "pruned_per_layer": pruned_per_layer,
        "layer_sizes": {n: int(len(groups.layer_groups[n])) for n in groups.layers},
        "times_s": ctx.times,
    }
    for p in repaired.parameters():
        p.requires_grad_(True)
    return RepairResult(model=repaired, prune=choice["prune"], prune_prob=scores, groups=groups, report=out)


def onp_scores(ctx: DefenseContext) -> tuple[torch.Tensor, dict]:
    """ONP proper: exposure features -> per-layer graphs -> GNN policy trained by RL on the D_opt reward.
    Returns the trained policy's prune probabilities [G] and the report part (features, graph, reward curve)."""
    cfg = ctx.cfg
    with ctx.phase("features"):
        feats = exposure_features(ctx.model, ctx.unlearned, ctx.groups, ctx.x_opt, ctx.y_opt, seed=cfg.seed,
                                  trigger=ctx.trigger)
    with ctx.phase("graphs"):
        graph = build_policy_graph(ctx.model, ctx.groups, feats, eps=cfg.graph_eps,
                                   cross_layer_topk=cfg.cross_layer_topk)
    scorer = ctx.scorer("opt")
    torch.manual_seed(cfg.seed)
    policy = PrunePolicy(graph.x.shape[1], graph.group_features.shape[1], conv=cfg.conv,
                         init_prune_prob=cfg.init_prune_prob)
    ppo = PPOConfig(iterations=cfg.iterations, samples=cfg.samples, algorithm=cfg.algorithm, seed=cfg.seed)
    with ctx.phase("policy"):
        bar = tqdm(total=cfg.iterations, desc="policy (RL)", disable=not ctx.progress, leave=False)

        def tick(it, hist):
            bar.update(1)
            bar.set_postfix(reward=f"{hist['reward_mean'][-1]:.3f}", pruned=f"{hist['prune_frac'][-1]:.3f}")

        hist = train_policy(policy, graph, scorer, ppo, progress=tick)
        bar.close()
    with torch.no_grad():
        prob = torch.sigmoid(policy(graph))
    return prob, {
        "features": FEATURE_NAMES,
        "graph": {"nodes": int(graph.x.shape[0]), "edges": int(graph.edge_index.shape[1])},
        "reward_curve": {"mean": hist["reward_mean"], "max": hist["reward_max"], "prune_frac": hist["prune_frac"]},
    }


def repair(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: RepairConfig | None = None,
           progress: bool = True) -> RepairResult:
    """Repairs a copy of `model` with the clean defense set (x [N, C, H, W] normalised float32, y [N] int64).

    Never sees test data, triggers or attack specs: only (x, y)."""
    ctx = prepare(model, x, y, num_classes, cfg, progress)
    prob, part = onp_scores(ctx)
    return finish(ctx, prob, part)


class _Phase:
    def __init__(self, name: str, times: dict, progress: bool):
        self.name, self.times, self.progress = name, times, progress

    def __enter__(self):
        self.t0 = time.perf_counter()
        if self.progress:
            tqdm.write(f"[onp] {self.name} ...")
        return self

    def __exit__(self, *exc):
        self.times[self.name] = round(time.perf_counter() - self.t0, 3)
        return False
