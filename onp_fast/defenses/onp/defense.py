"""ONP behind the Defense interface: exposure features -> per-layer graphs -> GNN policy trained by RL on the
D_opt reward; its scores are the trained policy's prune probabilities."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...distributed import world
from ...prepare import DefenseContext
from ...progress import bar
from ...errors import UserError
from ..base import Defense, register
from .features import FEATURE_NAMES, exposure_features
from .graph import build_policy_graph
from .policy import PrunePolicy
from .ppo import PPOConfig, train_policy
from .screen import screen_actions


@dataclass
class ONPConfig:
    """ONP's own settings: the policy (GNN kind, initial prune probability), its RL (iterations, K masks per
    iteration, algorithm), its action space (at most `actions` groups, screened by the exposure features when the
    model has more: screen.py; 0: every group) and the graphs (intra-layer cosine threshold, cross-layer
    top-k)."""

    iterations: int = 20  # why: docs/design.md, "Repair time"
    samples: int = 16
    algorithm: str = "ppo"  # or "reinforce"
    conv: str = "sage"  # or "gat"
    graph_eps: float = 0.9
    cross_layer_topk: int = 2
    init_prune_prob: float = 0.02
    actions: int = 2048  # why: docs/design.md, "The policy's action space"

    def check(self):
        """UserError naming a bad setting."""
        if self.actions < 0:
            raise UserError(f"onp.actions must be >= 0 (0: every group), got {self.actions}")


def policy_throughput(scorer, seconds: float) -> dict:
    """The policy phase's reward work: backend and precision, masks and image forwards scored
    (`MaskScorer.scored`; "ranks" and "masks_here", the masks this process scored itself, when torch.distributed
    shares them; "sequential", the sequential test's first look, and "stopped", the masks it stopped), the
    phase's seconds, masks/s and images/s over it."""
    masks, images = scorer.scored["masks"], scorer.scored["images"]
    rate = (lambda n: round(n / seconds, 1)) if seconds > 0 else (lambda n: None)
    return {"backend": scorer.backend, "precision": scorer.precision, "masks": masks, "images": images,
            "seconds": seconds, "masks_per_s": rate(masks), "images_per_s": rate(images), "ranks": world()[1],
            "masks_here": scorer.scored["masks_here"], "sequential": scorer.sequential,
            "stopped": scorer.scored["stopped"]}


def onp_scores(ctx: DefenseContext, cfg: ONPConfig) -> tuple[torch.Tensor, dict]:
    """-> (the trained policy's prune probabilities [G] in (0, 1), -inf for the groups outside its action space;
    the report part: the policy phase's reward throughput, feature names, graph size, action space, reward
    curve)."""
    seed = ctx.cfg.seed
    with ctx.phase("features"):
        feats = exposure_features(ctx.model, ctx.unlearned, ctx.groups, ctx.x_opt, ctx.y_opt, seed=seed,
                                  trigger=ctx.trigger, max_memory=ctx.cfg.activation_memory)
    with ctx.phase("graphs"):
        graph = build_policy_graph(ctx.model, ctx.groups, feats, eps=cfg.graph_eps,
                                   cross_layer_topk=cfg.cross_layer_topk)
        actions = None
        if 0 < cfg.actions < ctx.groups.num_groups:
            actions = screen_actions(feats, graph, cfg.actions)
    scorer = ctx.scorer("opt")
    torch.manual_seed(seed)
    policy = PrunePolicy(graph.x.shape[1], graph.group_features.shape[1], conv=cfg.conv,
                         init_prune_prob=cfg.init_prune_prob)
    ppo = PPOConfig(iterations=cfg.iterations, samples=cfg.samples, algorithm=cfg.algorithm, seed=seed)
    with ctx.phase("policy"):
        shown = bar(cfg.iterations, "policy (RL)", ctx.progress, unit="it")

        def tick(it, hist):
            shown.set_postfix(reward=f"{hist['reward_mean'][-1]:.3f}", pruned=f"{hist['prune_frac'][-1]:.3f}",
                              refresh=False)  # drawn by update, at the bar's redraw interval
            shown.update(1)

        with shown:
            hist = train_policy(policy, graph, scorer, ppo, progress=tick, actions=actions)
    with torch.no_grad():
        prob = torch.sigmoid(policy(graph))
    if actions is not None:
        prob = torch.full_like(prob, -float("inf")).index_copy_(0, actions, prob[actions])
    return prob, {
        "policy_reward": policy_throughput(scorer, ctx.times["policy"]),
        "features": FEATURE_NAMES,
        "graph": {"nodes": int(graph.x.shape[0]), "edges": int(graph.edge_index.shape[1])},
        "actions": {"decided": ctx.groups.num_groups if actions is None else len(actions),
                    "groups": ctx.groups.num_groups, "screened": actions is not None},
        "reward_curve": {"mean": hist["reward_mean"], "max": hist["reward_max"], "prune_frac": hist["prune_frac"]},
    }


@register
class ONP(Defense):
    name = "onp"
    title = "ONP: GNN policy trained by RL on the defense reward"
    Config = ONPConfig
    purify = "sam+proxy"  # why: docs/design.md, "Purification after pruning"

    def scores(self, ctx: DefenseContext) -> tuple[torch.Tensor, dict]:
        """-> the trained policy's prune probabilities [G] in (0, 1)."""
        return onp_scores(ctx, self.config)

    def effort(self) -> float:
        """The masks its RL scores (iterations x samples) as a share of the defaults' (ONPConfig()), at most 1."""
        default = ONPConfig()
        return min(1.0, self.config.iterations * self.config.samples / (default.iterations * default.samples))
