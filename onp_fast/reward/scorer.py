"""The reward of onp.md section 5, scored for K candidate masks at once.

R(m) = w_B CA_B(m) + w_T CA_T(m) + w_U CA_U(m) + w_P CA_P(m) - w_s sparsity(m), with
CA_T: B with m on D_opt images stamped with a trigger proxy synthesised from clean data (onp_fast.prepare; images
of the proxy's class left out), scored as the mean probability of the true label (continuous, so masks that
only weaken the trigger already earn credit): pruning the neurons that carry a backdoor defeats it;
CA_B: accuracy of the given model B with mask m; CA_U: accuracy of the unlearned model U with m (pruning
backdoor neurons of U restores its clean accuracy: RNP); CA_P: accuracy of B with m under fixed adversarial
neuron perturbations found on B (removing backdoor neurons makes B robust to them: ANP); sparsity: the
fraction of neurons (weight rows) pruned.

Two backends compute the same terms: "engine" (RewardEngine on the groups' mask points: all K masks of a call in
one batched pass per model, CA_B and CA_T images in one forward, the fused epilogue returning counts and
true-label probability sums) and "hooks" (the reference: one hooked forward per mask, `NeuronGroups.masked`).

The sequential test (`sequential` > 0, either backend) scores CA_B and CA_T of all K masks on a first share of
the images, and only the masks not already clearly failing the depth rule's tolerance on the rest: a mask whose
CA_B upper confidence bound on the first look (Wilson, z = SEQUENTIAL_Z) lies under the unmasked model's CA_B on
these images minus `tolerance` keeps its first-look CA_B and CA_T (unbiased estimates: the images are a seeded
random subset), the others are scored on every image as without the test.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from ..distributed import gather_rows, share, world
from ..errors import UserError
from ..groups import NeuronGroups
from ..memory import DEFAULT_MAX_MEMORY, fit_batch
from ..torchutil import autocast, check_precision
from .engine import RewardEngine
from .neurons import GroupPoints

TERMS = ("ca_b", "ca_t", "ca_u", "ca_p", "sparsity")
BACKENDS = ("engine", "hooks")
SEQUENTIAL_Z = 3.0  # the sequential test stops a mask only when its CA_B is this many standard errors under the floor


def check_backend(backend: str) -> str:
    """backend, or UserError (one line) when it is not one of BACKENDS."""
    if backend not in BACKENDS:
        raise UserError(f"unknown reward backend {backend!r}: use one of {', '.join(BACKENDS)}")
    return backend


@dataclass
class RewardWeights:
    ca_b: float = 1.0
    ca_t: float = 1.0
    ca_u: float = 0.0
    ca_p: float = 0.0
    sparsity: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)

    def combine(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """terms: name -> [K] -> rewards [K]."""
        return (self.ca_b * terms["ca_b"] + self.ca_t * terms["ca_t"] + self.ca_u * terms["ca_u"]
                + self.ca_p * terms["ca_p"] - self.sparsity * terms["sparsity"])


class MaskScorer:
    """Scores prune masks [K, G] bool on fixed data (x [B, C, H, W] normalised, y [B] int64).

    Models: B, and optionally U (unlearned) and perturbations [P, G] (multiplicative keep factors 1 + delta).
    Terms whose weight is 0 are not computed. backend: "engine" (RewardEngine over GroupPoints(groups), with
    `strategy` and `max_memory` passed on; "batched" by default, also on CPU: the masks the policy and the depth
    rule score prune too few channels for the sliced path's skipping to pay) or "hooks" (the per-mask loop with
    hooks, `NeuronGroups.masked`, in batches of at most `batch_size` images, fewer where `max_memory` cannot
    hold them); both give the same terms up to float rounding. `standard_error` (one mask, per-image values)
    always runs the hooked forward. Device: the models, x and y on one device; masks and the terms [K] on the
    CPU (the engine moves masks to the models and its results back). sequential: the share of the images in the
    sequential test's first look (0: off; module docstring), with `tolerance` the CA_B drop it measures against;
    it applies where CA_B is on and more than one mask is scored. precision (`torchutil.PRECISIONS`): the masks
    of `terms` (and so of a call) run under `torchutil.autocast` at it (float32: as is); `standard_error`
    always runs at float32. `scored` counts the masks and image forwards scored so far and the masks the test
    stopped."""

    def __init__(self, groups: NeuronGroups, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 weights: RewardWeights, unlearned: nn.Module | None = None,
                 perturbations: torch.Tensor | None = None, trigger=None, batch_size: int = 512,
                 backend: str = "engine", strategy: str = "batched",
                 max_memory: int | str = DEFAULT_MAX_MEMORY, sequential: float = 0.0, tolerance: float = 0.02,
                 precision: str = "float32"):
        self.backend = check_backend(backend)
        self.precision = check_precision(precision, x.device)
        if not 0 <= sequential < 1:
            raise UserError(f"the sequential test's first look is a share of the images in [0, 1): got {sequential}")
        self.sequential, self.tolerance = sequential, tolerance
        self._floor: float | None = None
        self._engine_args = {"strategy": strategy, "max_memory": max_memory}
        self._engines: dict[str, RewardEngine] = {}
        self.scored = {"masks": 0, "masks_here": 0, "images": 0, "stopped": 0}
        self.groups, self.model, self.unlearned = groups, model, unlearned
        self.x, self.y, self.weights = x, y, weights
        self.perturbations = perturbations
        self.x_t = self.y_t = None
        if trigger is not None:
            other = y != trigger.target
            self.x_t, self.y_t = trigger.apply(x[other]), y[other]
        self.batch_size = batch_size
        rows = torch.zeros(groups.num_groups)
        for g in groups.groups:
            rows[g.index] = max(1, len(g.rows))
        self.group_size = rows / rows.sum()

    @torch.no_grad()
    def _logits(self, model: nn.Module, keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """model with keep [G] on x [n, C, H, W] -> logits [n, classes], in batches of at most `batch_size` (fewer
        where `max_memory` cannot hold them)."""
        bs = fit_batch(model, x, self._engine_args["max_memory"], self.batch_size)  # before the hooks
        with self.groups.masked(model, keep):
            return torch.cat([model(x[i:i + bs]) for i in range(0, len(x), bs)])

    @staticmethod
    def _score(logits: torch.Tensor, y: torch.Tensor, soft: bool) -> torch.Tensor:
        """[n] float64: 1/0 top-1 correctness, or (soft) the probability of the true label (logits of any float
        dtype, taken to float32 first)."""
        logits = logits.float()
        if soft:
            return logits.softmax(1).gather(1, y.unsqueeze(1)).flatten().double()
        return (logits.argmax(1) == y).double()

    def _per_image(self, model: nn.Module, keep: torch.Tensor, x=None, y=None, soft: bool = False) -> torch.Tensor:
        """[n] float64 `_score` of model with keep on x, y (default: the scorer's clean images)."""
        x = self.x if x is None else x
        y = self.y if y is None else y
        if len(x) == 0:
            return torch.zeros(0, dtype=torch.float64)
        return self._score(self._logits(model, keep, x), y, soft)

    def _accuracy(self, model: nn.Module, keep: torch.Tensor, x=None, y=None, soft: bool = False) -> float:
        """Mean of `_per_image` (0 on no images)."""
        v = self._per_image(model, keep, x, y, soft)
        return float(v.mean()) if len(v) else 0.0

    def _clean_and_triggered(self, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B with keep [G] in one pass over x and x_t -> (top-1 correctness on x [n], true-label probability on
        x_t [n_t]), both float64."""
        n = len(self.x)
        logits = self._logits(self.model, keep, torch.cat([self.x, self.x_t]))
        return self._score(logits[:n], self.y, False), self._score(logits[n:], self.y_t, True)

    def _b_t(self, keep: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-image CA_B and CA_T values of keep [G] (None for a term that is off)."""
        w, with_t = self.weights, self._with_t()
        if w.ca_b and with_t:
            return self._clean_and_triggered(keep)
        return (self._per_image(self.model, keep) if w.ca_b else None,
                self._per_image(self.model, keep, self.x_t, self.y_t, soft=True) if with_t else None)

    def terms(self, prune: torch.Tensor) -> dict[str, torch.Tensor]:
        """prune [K, G] bool -> {term: [K] float32}. Inside a torch.distributed process group each rank
        scores its share of the K masks (`distributed.share`) and every rank gets all K terms
        (`distributed.gather_rows`); scored["masks_here"] counts the masks this process scored itself."""
        k = len(prune)
        rank, size = world()
        keep = (~prune[share(k, rank, size)]).float()
        out = {t: torch.zeros(len(keep)) for t in TERMS if t != "sparsity"}
        out["stopped"] = torch.zeros(len(keep))
        if len(keep):
            with autocast(self.x.device, self.precision):
                out.update(self._b_t_terms(keep, sequential=k > 1))
                out.update(self._engine_terms(keep) if self.backend == "engine" else self._hooked_terms(keep))
        out = gather_rows(out, k)
        stopped = out.pop("stopped").bool()
        out["sparsity"] = prune.float() @ self.group_size
        self.scored["masks"] += k
        self.scored["masks_here"] += len(keep)
        self.scored["stopped"] += int(stopped.sum())
        self.scored["images"] += k * self.images_per_mask() - int(stopped.sum()) * self._unseen()
        return out

    def _with_t(self) -> bool:
        """Whether CA_T is on and has stamped images."""
        return bool(self.weights.ca_t) and self.x_t is not None and len(self.x_t) > 0

    def _first_look(self) -> tuple[int, int]:
        """(clean, stamped) images of the sequential test's first look."""
        n_t = len(self.x_t) if self._with_t() else 0
        return max(1, math.ceil(self.sequential * len(self.x))), math.ceil(self.sequential * n_t)

    def _unseen(self) -> int:
        """Image forwards a mask the sequential test stops is spared (0 with the test off)."""
        if not self.sequential or not self.weights.ca_b:
            return 0
        n1, n1_t = self._first_look()
        return len(self.x) - n1 + ((len(self.x_t) - n1_t) if self._with_t() else 0)

    def floor(self) -> float:
        """CA_B of the unmasked model on the scorer's images minus the tolerance (computed once)."""
        if self._floor is None:
            correct, _ = self._b_t_sums(torch.ones(1, self.groups.num_groups), slice(0, len(self.x)), slice(0, 0))
            self._floor = float(correct[0]) / len(self.x) - self.tolerance
        return self._floor

    def _b_t_sums(self, keep: torch.Tensor, clean: slice, stamped: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """keep [K, G] float -> (CA_B correct counts on x[clean] [K], CA_T true-label probability sums on
        x_t[stamped] [K]), float64, in one pass per mask set by the scorer's backend."""
        x, y = self.x[clean], self.y[clean]
        x_t, y_t = (self.x_t[stamped], self.y_t[stamped]) if self._with_t() else (self.x[:0], self.y[:0])
        if self.backend == "engine":
            res_b, res_t = self._engine("b").score_parts(keep, [(x, y), (x_t, y_t)])
            prob = res_t.prob_sum[0, 0].double() if len(x_t) else torch.zeros(len(keep), dtype=torch.float64)
            return res_b.correct[0, 0].double().cpu(), prob.cpu()
        correct = torch.zeros(len(keep), dtype=torch.float64)
        prob = torch.zeros(len(keep), dtype=torch.float64)
        both = torch.cat([x, x_t])
        for i in range(len(keep)):
            logits = self._logits(self.model, keep[i], both)
            correct[i] = self._score(logits[:len(x)], y, False).sum()
            prob[i] = self._score(logits[len(x):], y_t, True).sum()
        return correct, prob

    def _b_t_terms(self, keep: torch.Tensor, sequential: bool) -> dict[str, torch.Tensor]:
        """keep [K, G] float -> {"ca_b", "ca_t" (those on), "stopped"}: [K] float32; the sequential test where
        it is on and `sequential`."""
        w, n = self.weights, len(self.x)
        with_t = self._with_t()
        n_t = len(self.x_t) if with_t else 0
        if not (w.ca_b or with_t):
            return {}
        stopped = torch.zeros(len(keep), dtype=torch.bool)
        if self.sequential and w.ca_b and sequential and self._unseen() > 0:
            n1, n1_t = self._first_look()
            correct, prob = self._b_t_sums(keep, slice(0, n1), slice(0, n1_t))
            stopped = _upper_bound(correct, n1) < self.floor()
            live = ~stopped
            if live.any():
                rest_c, rest_p = self._b_t_sums(keep[live], slice(n1, n), slice(n1_t, n_t))
                correct[live] += rest_c
                prob[live] += rest_p
            seen = torch.where(stopped, n1, n).double()
            seen_t = torch.where(stopped, n1_t, n_t).double()
        else:
            correct, prob = self._b_t_sums(keep, slice(0, n if w.ca_b else 0), slice(0, n_t))
            seen = torch.full((len(keep),), float(n), dtype=torch.float64)
            seen_t = torch.full((len(keep),), float(n_t), dtype=torch.float64)
        out = {"stopped": stopped.float()}
        if w.ca_b:
            out["ca_b"] = (correct / seen.clamp(min=1)).float()
        if with_t:
            out["ca_t"] = (prob / seen_t.clamp(min=1)).float()
        return out

    def images_per_mask(self) -> int:
        """Image forwards one mask takes: n for CA_B, n_t for CA_T, n for CA_U, n per perturbation for CA_P
        (terms that are off take none)."""
        w, n = self.weights, len(self.x)
        n_t = len(self.x_t) if w.ca_t and self.x_t is not None else 0
        n_u = n if w.ca_u and self.unlearned is not None else 0
        n_p = n * len(self.perturbations) if w.ca_p and self.perturbations is not None else 0
        return (n if w.ca_b else 0) + n_t + n_u + n_p

    def _engine(self, which: str) -> RewardEngine:
        """The RewardEngine of model B (which="b") or U ("u") over the groups' mask points, built once."""
        if which not in self._engines:
            model = self.model if which == "b" else self.unlearned
            self._engines[which] = RewardEngine(model, GroupPoints(self.groups), **self._engine_args)
        return self._engines[which]

    def _engine_terms(self, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """keep [K, G] float -> {term: [K] float32} for CA_U and CA_P where they are on, by the engine: CA_U on U,
        CA_P as the K x P masks keep * perturbation, averaged over P (CA_B and CA_T: `_b_t_terms`)."""
        w, k = self.weights, len(keep)
        out = {}
        if w.ca_u and self.unlearned is not None:
            out["ca_u"] = _mean(self._engine("u").score(keep, self.x, self.y).correct[0, 0], len(self.x))
        if w.ca_p and self.perturbations is not None:
            p = self.perturbations.to(keep)
            masks = (keep.unsqueeze(1) * p.unsqueeze(0)).reshape(k * len(p), -1)
            correct = self._engine("b").score(masks, self.x, self.y).correct[0, 0].view(k, len(p))
            out["ca_p"] = _mean(correct.sum(1), len(self.x) * len(p))
        return out

    def _hooked_terms(self, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """keep [K, G] float -> {term: [K] float32} for CA_U and CA_P where they are on: one hooked forward per
        mask (and per perturbation for CA_P)."""
        k, w = len(keep), self.weights
        out = {}
        if w.ca_u and self.unlearned is not None:
            out["ca_u"] = torch.tensor([self._accuracy(self.unlearned, keep[i]) for i in range(k)])
        if w.ca_p and self.perturbations is not None:
            out["ca_p"] = torch.tensor([sum(self._accuracy(self.model, keep[i] * p) for p in self.perturbations)
                                        / len(self.perturbations) for i in range(k)])
        return out

    def standard_error(self, prune: torch.Tensor) -> float:
        """prune [G] bool -> the standard error of R(prune) as an estimate from this finite image set: the terms'
        per-image values, var / n summed over terms with weight^2 (terms treated as independent)."""
        keep = (~prune).float()
        w = self.weights
        parts = [(wt, v) for wt, v in zip((w.ca_b, w.ca_t), self._b_t(keep)) if v is not None]
        if w.ca_u and self.unlearned is not None:
            parts.append((w.ca_u, self._per_image(self.unlearned, keep)))
        if w.ca_p and self.perturbations is not None:
            per = torch.stack([self._per_image(self.model, keep * p) for p in self.perturbations]).mean(0)
            parts.append((w.ca_p, per))
        var = sum(wt * wt * float(v.var(unbiased=True)) / len(v) for wt, v in parts if len(v) > 1)
        return var ** 0.5

    def __call__(self, prune: torch.Tensor) -> torch.Tensor:
        return self.weights.combine(self.terms(prune))


def _upper_bound(correct: torch.Tensor, n: int, z: float = SEQUENTIAL_Z) -> torch.Tensor:
    """Wilson score upper confidence bound [K] of an accuracy from correct counts [K] over n images."""
    p = correct / n
    centre = p + z * z / (2 * n)
    spread = z * torch.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre + spread) / (1 + z * z / n)


def _mean(total: torch.Tensor, n: int) -> torch.Tensor:
    """Per-mask sums [K] over n images -> means [K] float32 (0 on no images)."""
    return (total.double() / n).float() if n else torch.zeros(len(total))
