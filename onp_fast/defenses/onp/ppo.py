"""PPO (and REINFORCE with a mean baseline) over a product of Bernoulli group decisions.

The state (the model's graphs) does not change between steps, so one iteration is: sample K masks from the
policy, score them all at once with `score(prune [K, G] bool) -> rewards [K]`, then take `epochs` clipped
policy-gradient steps on those K samples with a mean-reward baseline and an entropy bonus.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .graph import PolicyGraph
from .policy import PrunePolicy


@dataclass
class PPOConfig:
    iterations: int = 200
    samples: int = 32  # K masks per iteration
    lr: float = 3e-3
    epochs: int = 4  # PPO epochs per batch (1 with algorithm="reinforce")
    clip: float = 0.2
    entropy: float = 1e-3
    algorithm: str = "ppo"  # or "reinforce"
    seed: int = 0


def _log_prob(logits: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
    """logits [G], prune [K, G] float -> log pi(prune) [K]."""
    return -torch.nn.functional.binary_cross_entropy_with_logits(
        logits.expand_as(prune), prune, reduction="none").sum(1)


def train_policy(policy: PrunePolicy, graph: PolicyGraph, score: Callable[[torch.Tensor], torch.Tensor],
                 cfg: PPOConfig, progress=None, actions: torch.Tensor | None = None) -> dict:
    """Trains `policy` in place. score(prune [K, G] bool) -> rewards [K] float. actions [M] int64: the groups
    the policy decides (screen.screen_actions); the others are never pruned, and only the M decisions enter
    the log-probabilities (None: every group). Returns the history: lists reward_mean, reward_max, prune_frac
    (the mean over the decided groups; one entry per iteration)."""
    if cfg.algorithm not in ("ppo", "reinforce"):
        raise ValueError(f"algorithm must be 'ppo' or 'reinforce', got {cfg.algorithm!r}")
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    hist = {"reward_mean": [], "reward_max": [], "prune_frac": []}
    epochs = cfg.epochs if cfg.algorithm == "ppo" else 1
    decided = (lambda: policy(graph)) if actions is None else (lambda: policy(graph)[actions])
    for it in range(cfg.iterations):
        with torch.no_grad():
            logits = decided()
            probs = torch.sigmoid(logits)
            prune = (torch.rand(cfg.samples, len(probs), generator=gen) < probs).float()
            old_lp = _log_prob(logits, prune)
        full = prune.bool()
        if actions is not None:
            full = torch.zeros(cfg.samples, graph.num_groups, dtype=torch.bool)
            full[:, actions] = prune.bool()
        rewards = score(full).float()
        adv = rewards - rewards.mean()
        adv = adv / (adv.std() + 1e-8) if len(adv) > 1 else adv
        for _ in range(epochs):
            logits = decided()
            lp = _log_prob(logits, prune)
            if cfg.algorithm == "ppo":
                ratio = torch.exp(lp - old_lp)
                loss = -torch.min(ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv).mean()
            else:
                loss = -(lp * adv).mean()
            p = torch.sigmoid(logits)
            ent = -(p * torch.log(p + 1e-8) + (1 - p) * torch.log(1 - p + 1e-8)).mean()
            opt.zero_grad(set_to_none=True)
            (loss - cfg.entropy * ent).backward()
            opt.step()
        hist["reward_mean"].append(float(rewards.mean()))
        hist["reward_max"].append(float(rewards.max()))
        hist["prune_frac"].append(float(prune.mean()))
        if progress is not None:
            progress(it, hist)
    return hist
