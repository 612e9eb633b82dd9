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
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from ..distributed import gather_rows, share, world
from ..errors import UserError
from ..groups import NeuronGroups
from ..memory import DEFAULT_MAX_MEMORY, fit_batch
from .engine import RewardEngine
from .neurons import GroupPoints

TERMS = ("ca_b", "ca_t", "ca_u", "ca_p", "sparsity")
BACKENDS = ("engine", "hooks")


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
    CPU (the engine moves masks to the models and its results back)."""

    def __init__(self, groups: NeuronGroups, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 weights: RewardWeights, unlearned: nn.Module | None = None,
                 perturbations: torch.Tensor | None = None, trigger=None, batch_size: int = 512,
                 backend: str = "engine", strategy: str = "batched",
                 max_memory: int | str = DEFAULT_MAX_MEMORY):
        self.backend = check_backend(backend)
        self._engine_args = {"strategy": strategy, "max_memory": max_memory}
        self._engines: dict[str, RewardEngine] = {}
        self.scored = {"masks": 0, "masks_here": 0, "images": 0}  # by `terms` so far, and the image forwards
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
        """[n] float64: 1/0 top-1 correctness, or (soft) the probability of the true label."""
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
        w = self.weights
        with_t = bool(w.ca_t) and self.x_t is not None and len(self.x_t) > 0
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
        if len(keep):
            out.update(self._engine_terms(keep) if self.backend == "engine" else self._hooked_terms(keep))
        out = gather_rows(out, k)
        out["sparsity"] = prune.float() @ self.group_size
        self.scored["masks"] += k
        self.scored["masks_here"] += len(keep)
        self.scored["images"] += k * self.images_per_mask()
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
        """keep [K, G] float -> {term: [K] float32} for the model terms that are on, by the engine: CA_B (clean
        correct / n) and CA_T (true-label probability sum / n_t on the stamped images) from one forward,
        CA_U on U, CA_P as the K x P masks keep * perturbation, averaged over P."""
        w, k = self.weights, len(keep)
        with_t = bool(w.ca_t) and self.x_t is not None and len(self.x_t) > 0
        out = {}
        if w.ca_b or with_t:
            empty = (self.x[:0], self.y[:0])
            clean, stamped = self._engine("b").score_parts(
                keep, [(self.x, self.y) if w.ca_b else empty, (self.x_t, self.y_t) if with_t else empty])
            if w.ca_b:
                out["ca_b"] = _mean(clean.correct[0, 0], len(self.x))
            if with_t:
                out["ca_t"] = _mean(stamped.prob_sum[0, 0], len(self.x_t))
        if w.ca_u and self.unlearned is not None:
            out["ca_u"] = _mean(self._engine("u").score(keep, self.x, self.y).correct[0, 0], len(self.x))
        if w.ca_p and self.perturbations is not None:
            p = self.perturbations.to(keep)
            masks = (keep.unsqueeze(1) * p.unsqueeze(0)).reshape(k * len(p), -1)
            correct = self._engine("b").score(masks, self.x, self.y).correct[0, 0].view(k, len(p))
            out["ca_p"] = _mean(correct.sum(1), len(self.x) * len(p))
        return out

    def _hooked_terms(self, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """keep [K, G] float -> {term: [K] float32} for the model terms that are on: one hooked forward per
        mask (and per perturbation for CA_P)."""
        k = len(keep)
        out = {t: torch.zeros(k) for t in ("ca_b", "ca_t", "ca_u", "ca_p")}
        w = self.weights
        for i in range(k):
            for name, v in zip(("ca_b", "ca_t"), self._b_t(keep[i])):
                if v is not None:
                    out[name][i] = float(v.mean())
            if w.ca_u and self.unlearned is not None:
                out["ca_u"][i] = self._accuracy(self.unlearned, keep[i])
            if w.ca_p and self.perturbations is not None:
                out["ca_p"][i] = sum(self._accuracy(self.model, keep[i] * p) for p in self.perturbations) / len(
                    self.perturbations)
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


def _mean(total: torch.Tensor, n: int) -> torch.Tensor:
    """Per-mask sums [K] over n images -> means [K] float32 (0 on no images)."""
    return (total.double() / n).float() if n else torch.zeros(len(total))
