"""What the reward engine (and its references) return."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RewardResult:
    """Scores for M models x S = 1 + P perturbation settings (0 = unperturbed) x K masks on B images.

    correct:      [M, S, K] int64, number of images whose argmax is the label.
    ce_sum:       [M, S, K] float64, summed cross-entropy.
    class_counts: [M, S, K, num_classes] int64, how many images are predicted as each class.
    logits:       [M, S, K, B, num_classes] float32 when asked for, else None.
    prob_sum:     [M, S, K] float64, summed softmax probability of the label (None where not computed).
    """

    correct: torch.Tensor
    ce_sum: torch.Tensor
    class_counts: torch.Tensor
    logits: torch.Tensor | None = None
    prob_sum: torch.Tensor | None = None


@dataclass
class Perturbations:
    """P ANP-style multiplicative perturbations on the masked BN units: gamma' = gamma * (1 + d_gamma[p, n]),
    beta' = beta * (1 + d_beta[p, n]). d_gamma, d_beta: [P, N] float32."""

    d_gamma: torch.Tensor
    d_beta: torch.Tensor

    def __post_init__(self):
        if self.d_gamma.shape != self.d_beta.shape or self.d_gamma.dim() != 2:
            raise ValueError(f"perturbations must be two [P, N] tensors, got {tuple(self.d_gamma.shape)} "
                             f"and {tuple(self.d_beta.shape)}")

    @property
    def count(self) -> int:
        return int(self.d_gamma.shape[0])

    @staticmethod
    def random(p: int, n: int, eps: float = 0.4, seed: int = 0) -> "Perturbations":
        """P uniform perturbations in [-eps, eps] (ANP's range), seeded."""
        g = torch.Generator().manual_seed(seed)
        return Perturbations((torch.rand(p, n, generator=g) * 2 - 1) * eps,
                             (torch.rand(p, n, generator=g) * 2 - 1) * eps)
