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
    val_fraction: float = 0.2
    reward_batch: int = 128  # images of D_opt scored per iteration (a fixed seeded subset)
    graph_eps: float = 0.9
    cross_layer_topk: int = 2
    perturbations: int = 2
    perturb_eps: float = 0.4
    unlearn_lr: float = 0.01
    init_prune_prob: float = 0.02

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


def repair(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: RepairConfig | None = None,
           progress: bool = True) -> RepairResult:
    """Repairs a copy of `model` with the clean defense set (x [N, C, H, W] normalised float32, y [N] int64).

    Never sees test data, triggers or attack specs: only (x, y)."""
    cfg = cfg or RepairConfig()
    if len(x) == 0:
        raise UserError("the defense set is empty")
    if len(x) < num_classes:
        raise UserError(f"the defense set has {len(x)} images, fewer than the {num_classes} classes")
    if y.min() < 0 or y.max() >= num_classes:
        raise UserError(f"defense labels must lie in [0, {num_classes - 1}]")
    torch.manual_seed(cfg.seed)
    times: dict[str, float] = {}
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)

    def phase(name):
        return _Phase(name, times, progress)

    with phase("split"):
        i_opt, i_val = stratified_split(y, cfg.val_fraction, cfg.seed)
        x_opt, y_opt, x_val, y_val = x[i_opt], y[i_opt], x[i_val], y[i_val]
    with phase("groups"):
        groups = find_groups(model, tuple(x.shape[1:]))
    with phase("unlearn"):
        unlearned, unlearn_info = unlearn(model, x_opt, y_opt, lr=cfg.unlearn_lr, seed=cfg.seed)
    with phase("trigger"):
        trigger = synthesize_trigger(model, x_opt, y_opt, num_classes, seed=cfg.seed) if cfg.weights.ca_t else None
    with phase("features"):
        feats = exposure_features(model, unlearned, groups, x_opt, y_opt, seed=cfg.seed, trigger=trigger)
    with phase("graphs"):
        graph = build_policy_graph(model, groups, feats, eps=cfg.graph_eps, cross_layer_topk=cfg.cross_layer_topk)
    with phase("perturbations"):
        perts = adversarial_perturbations(model, groups, x_opt, y_opt, count=cfg.perturbations,
                                          eps=cfg.perturb_eps, seed=cfg.seed) if cfg.weights.ca_p else None
    gen = torch.Generator().manual_seed(cfg.seed)
    sub = torch.randperm(len(x_opt), generator=gen)[: cfg.reward_batch]
    scorer = MaskScorer(groups, model, x_opt[sub], y_opt[sub], cfg.weights, unlearned, perts, trigger)
    torch.manual_seed(cfg.seed)
    policy = PrunePolicy(graph.x.shape[1], graph.group_features.shape[1], conv=cfg.conv,
                         init_prune_prob=cfg.init_prune_prob)
    ppo = PPOConfig(iterations=cfg.iterations, samples=cfg.samples, algorithm=cfg.algorithm, seed=cfg.seed)
    with phase("policy"):
        bar = tqdm(total=cfg.iterations, desc="policy (RL)", disable=not progress, leave=False)

        def tick(it, hist):
            bar.update(1)
            bar.set_postfix(reward=f"{hist['reward_mean'][-1]:.3f}", pruned=f"{hist['prune_frac'][-1]:.3f}")

        hist = train_policy(policy, graph, scorer, ppo, progress=tick)
        bar.close()
    with phase("select"), torch.no_grad():
        prob = torch.sigmoid(policy(graph))
        val_scorer = MaskScorer(groups, model, x_val, y_val, cfg.weights, unlearned, perts, trigger)
        choice = choose_depth(prob, val_scorer, tolerance=cfg.tolerance)
    with phase("apply"):
        repaired = groups.prune_(copy.deepcopy(model), ~choice["prune"])
        ca_val_after = accuracy_of(repaired, x_val, y_val)
    pruned_per_layer = {}
    for gi in torch.nonzero(choice["prune"]).flatten().tolist():
        for name, _ in groups.groups[gi].rows:
            pruned_per_layer[name] = pruned_per_layer.get(name, 0) + 1
    report = {
        "config": cfg.to_dict(),
        "defense": {"n": len(x), "n_opt": len(x_opt), "n_val": len(x_val)},
        "groups": {"count": groups.num_groups, "layers": len(groups.layers),
                   "kinds": {k: sum(g.kind == k for g in groups.groups) for k in ("channel", "coupled", "head")}},
        "unlearn": unlearn_info,
        "trigger_proxy": None if trigger is None else {
            "target": trigger.target, "anomaly_index": round(trigger.anomaly_index, 3),
            "mask_l1_per_class": [round(float(v), 3) for v in trigger.norms]},
        "features": FEATURE_NAMES,
        "graph": {"nodes": int(graph.x.shape[0]), "edges": int(graph.edge_index.shape[1])},
        "reward_curve": {"mean": hist["reward_mean"], "max": hist["reward_max"], "prune_frac": hist["prune_frac"]},
        "stopping_rule": {"rule": choice["rule"], "depth": choice["depth"], "table": choice["table"]},
        "ca_val_before": choice["ca_b_before"],
        "ca_val_after": ca_val_after,
        "pruned_groups": int(choice["prune"].sum()),
        "pruned_per_layer": pruned_per_layer,
        "layer_sizes": {n: int(len(groups.layer_groups[n])) for n in groups.layers},
        "times_s": times,
    }
    for p in repaired.parameters():
        p.requires_grad_(True)
    return RepairResult(model=repaired, prune=choice["prune"], prune_prob=prob, groups=groups, report=report)


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
