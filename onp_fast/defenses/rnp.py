"""RNP (Li et al., ICML 2023): unlearn the model, then learn neuron masks that recover the unlearned model's
clean accuracy; neurons whose masks fall are backdoor-related. Here over neuron groups (onp_fast.groups):
a group's mask scales all its channels (RNP masks BN channels)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..groups import NeuronGroups
from ..prepare import DefenseContext, unlearn
from ..progress import bar
from ..torchutil import frozen
from .base import Defense, register


def rnp_scores(unlearned: nn.Module, groups: NeuronGroups, x: torch.Tensor, y: torch.Tensor, *, lr: float = 0.2,
               epochs: int = 20, alpha: float = 0.2, batch_size: int = 128, seed: int = 0,
               progress: bool = False) -> torch.Tensor:
    """RNP's recovery step over groups: masks m in [0, 1]^G, initialised at 1, trained by SGD (momentum 0.9,
    clipped to [0, 1]) to minimise alpha * CE of U with m on (x [N, C, H, W] normalised, y [N]).
    Returns prune scores [G] float32 = 1 - m: higher = prune first. progress: a bar of the steps on stderr
    (onp_fast.progress.bar)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.ones(groups.num_groups, requires_grad=True)
    opt = torch.optim.SGD([m], lr=lr, momentum=0.9)
    with frozen(unlearned), bar(epochs * -(-len(x) // batch_size), "rnp recover", progress) as shown:
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), batch_size):
                idx = order[i:i + batch_size]
                with groups.masked(unlearned, m):
                    loss = alpha * F.cross_entropy(unlearned(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    m.clamp_(0, 1)
                shown.update(1)
    return (1 - m.detach()).float()


@dataclass
class RNPConfig:
    unlearn_lr: float = 0.01  # gradient ascent on the clean loss ...
    unlearn_target: float = 0.2  # ... until clean accuracy on D_opt falls to this
    unlearn_epochs: int = 20  # at most
    recover_lr: float = 0.2
    recover_epochs: int = 20
    alpha: float = 0.2
    batch_size: int = 128
    threshold: float = 0.2  # RNP's own rule: prune masks below it (reported beside the shared rule)


def _prepare_unlearns_like(cfg: RNPConfig, ctx: DefenseContext) -> bool:
    """Whether prepare's unlearned copy (unlearn() on D_opt with ctx.cfg.unlearn_lr and unlearn's defaults)
    is exactly the one RNP's config asks for."""
    d = {k: v.default for k, v in inspect.signature(unlearn).parameters.items()}
    return (cfg.unlearn_lr == ctx.cfg.unlearn_lr and cfg.unlearn_target == d["target_acc"]
            and cfg.unlearn_epochs == d["max_epochs"] and cfg.batch_size == d["batch_size"])


@register
class RNP(Defense):
    name = "rnp"
    title = "RNP: reconstructive neuron pruning (Li et al. 2023)"
    Config = RNPConfig

    def scores(self, ctx: DefenseContext) -> tuple[torch.Tensor, dict]:
        """-> [G] in [0, 1]: 1 - the recovered mask of each group. Unlearning reuses prepare's copy when its
        settings are RNP's (the defaults), else runs here."""
        c = self.config
        if _prepare_unlearns_like(c, ctx):
            unlearned, info, shared = ctx.unlearned, ctx.unlearn_info, True
        else:
            with ctx.phase("rnp unlearn"):
                unlearned, info = unlearn(ctx.model, ctx.x_opt, ctx.y_opt, lr=c.unlearn_lr,
                                          target_acc=c.unlearn_target, max_epochs=c.unlearn_epochs,
                                          batch_size=c.batch_size, seed=ctx.cfg.seed, progress=ctx.progress)
            shared = False
        with ctx.phase("rnp recover"):
            scores = rnp_scores(unlearned, ctx.groups, ctx.x_opt, ctx.y_opt, lr=c.recover_lr,
                                epochs=c.recover_epochs, alpha=c.alpha, batch_size=c.batch_size, seed=ctx.cfg.seed,
                                progress=ctx.progress)
        return scores, {"unlearn": {**info, "shared_with_prepare": shared},
                        "own_rule": f"mask < {c.threshold:g}",
                        "own_rule_groups": int((scores > 1 - c.threshold).sum())}
