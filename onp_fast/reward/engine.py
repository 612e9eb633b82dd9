"""The batched masked-forward reward engine: score K masks on M models x (1 + P) perturbation settings.

What is masked: a NeuronSet (BN channels, masks [K, N]) or GroupPoints (every mask point of neuron groups: BN
and LayerNorm outputs, coupled residual-stream groups at every member point, conv/linear outputs no norm
follows, attention heads; masks are group masks [K, G]). Per call: the unmasked prefix runs once per model;
the masks' BN scale/shift (mask and perturbation folded into eval-mode BN) and the other sites' channel masks
are computed for all K at once; then either
  sliced  (CPU default): one mask at a time, zeroed channels skipped (sliced conv weights, fused
          BN + mask + ReLU gathering the survivors), channels-last; or
  batched (CUDA default): chunks of masks folded into the batch, fused BN + mask + ReLU in place;
and the logits of a chunk go through the fused epilogue (correct, CE sum, per-class counts, true-label
probability sum), per image part when the images are given in parts (`score_parts`).
K is chunked so the activations stay under `max_memory`; where one mask over all the images does not fit, the
images are too (the epilogue's sums add up over image chunks).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..errors import UserError
from ..ops.masked_forward import reward_epilogue
from .memory import DEFAULT_MAX_MEMORY, chunk_size, parse_memory
from .neurons import GroupPoints, NeuronSet, bn_neurons
from .plan import ChunkContext, ModelPlan
from .result import Perturbations, RewardResult

STRATEGIES = ("auto", "sliced", "batched")


class RewardEngine:
    """Compiles each model once; `score` reuses the plans.

    models:     one nn.Module or several with the same mask sites (e.g. the model and its unlearned copy),
                float32, on one device; they take normalised images.
    neurons:    what is masked: a NeuronSet (default: every BN channel of models[0], module order) or
                GroupPoints (the mask points of neuron groups; masks are group masks).
    max_memory: activation budget in bytes or a size string ("512MB"); K is chunked to stay under it, and the
                images where one mask over all of them does not fit.
    strategy:   "sliced", "batched" or "auto" (sliced on CPU, batched on CUDA).
    """

    def __init__(self, models: nn.Module | Sequence[nn.Module], neurons: NeuronSet | GroupPoints | None = None, *,
                 max_memory: int | str = DEFAULT_MAX_MEMORY, strategy: str = "auto"):
        models = [models] if isinstance(models, nn.Module) else list(models)
        if not models:
            raise UserError("the reward engine needs at least one model")
        if strategy not in STRATEGIES:
            raise UserError(f"unknown reward strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
        self.neurons = neurons or bn_neurons(models[0])
        sites = [self.neurons.sites(m) for m in models]
        if any(s != sites[0] for s in sites[1:]):
            raise UserError("the models do not share the same mask sites")
        self.sites = sites[0]
        self.plans = [ModelPlan(m, self.sites) for m in models]
        params = [p for m in models for p in m.parameters()]
        self.device = params[0].device if params else torch.device("cpu")
        if any(p.device != self.device for p in params) or any(p.dtype != torch.float32 for p in params):
            raise UserError("the reward engine needs float32 models on one device")
        chans = [{k: b.num_features for k, b in plan.bns.items()} for plan in self.plans]
        if any(c != chans[0] for c in chans[1:]):
            raise UserError("the models do not share the same BatchNorm layout")
        self.channels = chans[0]
        self.max_memory = parse_memory(max_memory)
        self.strategy = ("batched" if self.device.type == "cuda" else "sliced") if strategy == "auto" else strategy
        self._mem_cache: dict = {}

    @property
    def num_neurons(self) -> int:
        return self.neurons.size

    def chunk(self, k: int, images: torch.Tensor) -> int:
        """How many masks run at once for K = k masks on images [B, ...] under max_memory."""
        shared, per_mask = self.memory_per_mask(images)
        if self.strategy == "sliced":  # one mask's activations live at a time; chunk = epilogue batch
            chunk_size(k, per_mask, shared, self.max_memory)
            return k
        return chunk_size(k, per_mask, shared, self.max_memory)

    def images_per_pass(self, images: torch.Tensor) -> int:
        """How many of images [B, ...] one pass takes under max_memory: all B when one mask over all of them fits
        (then K is chunked, `chunk`), else the most whose prefix and one mask fit; UserError when not one does."""
        shared, per_mask = self.memory_per_mask(images)
        if shared + per_mask <= self.max_memory:
            return images.shape[0]
        shared, per_mask = self.memory_per_mask(images[:1])
        chunk_size(1, per_mask, shared, self.max_memory)  # not even one image: UserError
        return max(1, self.max_memory // (shared + per_mask))

    def memory_per_mask(self, images: torch.Tensor) -> tuple[int, int]:
        """(shared, per_mask) activation bytes for images [B, ...] (prefix values, one mask's live peak)."""
        key = tuple(images.shape)
        if key not in self._mem_cache:
            plan = self.plans[0]
            with _eval(plan.model):
                shared, per = plan.activation_bytes(images[:1].to(self.device, torch.float32))
            self._mem_cache[key] = (shared * images.shape[0], per * images.shape[0])
        return self._mem_cache[key]

    def score(self, masks: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
              perturbations: Perturbations | None = None, return_logits: bool = False) -> RewardResult:
        """Scores every (model, setting, mask).

        masks:  [K, N] float, N = the neuron set's size (NeuronSet: 0/1 or soft in [0, 1]; GroupPoints: group
                keep factors >= 0).
        images: [B, C, H, W] float32, normalised. labels: [B] int64.
        perturbations: optional P perturbations (NeuronSet only); setting 0 is unperturbed, 1..P perturbed.
        Returns a RewardResult with [M, 1 + P, K, ...] tensors (logits only when return_logits).
        """
        return self.score_parts(masks, [(images, labels)], perturbations, return_logits)[0]

    @torch.no_grad()
    def score_parts(self, masks: torch.Tensor, parts: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    perturbations: Perturbations | None = None, return_logits: bool = False) -> list[RewardResult]:
        """`score` on several image sets in one pass: parts [(images [B_i, ...], labels [B_i])] run as one
        batch (one forward per chunk of masks), each part reduced by its own epilogue. Empty parts are allowed
        (zero counts). Returns one RewardResult per part."""
        sizes = [len(x) for x, _ in parts]
        if not parts or sum(sizes) == 0:
            raise UserError("the reward engine needs at least one image")
        images = torch.cat([x for x, _ in parts]) if len(parts) > 1 else parts[0][0]
        labels = torch.cat([y for _, y in parts]) if len(parts) > 1 else parts[0][1]
        masks, images, labels = self._check(masks, images, labels, perturbations)
        K = masks.shape[0]
        settings = 1 + (perturbations.count if perturbations is not None else 0)
        M = len(self.plans)
        ic = self.images_per_pass(images)
        site_masks = self.neurons.site_masks(masks, self.sites)
        bn_masks = {name: site_masks[(name, "out")] for name in self.plans[0].bns}
        other = {key: m.contiguous() for key, m in site_masks.items() if key[0] not in bn_masks}
        keep = {name: _keep_sets(m) for name, m in bn_masks.items()} if self.strategy == "sliced" else None
        factors = self._perturbation_factors(perturbations)
        if self.strategy == "sliced" and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        bounds = [0]
        for n in sizes:
            bounds.append(bounds[-1] + n)
        out = [_Accumulator(M, settings, K, n, return_logits) for n in sizes]
        for i0 in range(0, len(images), ic):  # one pass unless one mask over every image exceeds the budget
            i1 = min(len(images), i0 + ic)
            kc = self.chunk(K, images[i0:i1])
            for mi, plan in enumerate(self.plans):
                with _eval(plan.model):
                    static = plan.run_static(images[i0:i1])
                    for si in range(settings):
                        scale, shift = self._scale_shift(plan, bn_masks, factors, si)
                        for k0 in range(0, K, kc):
                            k1 = min(K, k0 + kc)
                            ctx = ChunkContext({n: t[k0:k1] for n, t in scale.items()},
                                               {n: t[k0:k1] for n, t in shift.items()},
                                               {n: v[k0:k1] for n, v in keep.items()} if keep is not None else {},
                                               {key: m[k0:k1] for key, m in other.items()})
                            if self.strategy == "sliced":
                                logits = torch.stack([plan.run_sliced(static, ctx, k) for k in range(k1 - k0)])
                            else:
                                logits = plan.run_batched(static, ctx, k1 - k0)
                            for acc, b0, b1 in zip(out, bounds[:-1], bounds[1:]):
                                lo = max(b0, i0)  # this part's images in this pass: lo .. hi (maybe none)
                                hi = max(lo, min(b1, i1))
                                acc.add(mi, si, k0, logits[:, lo - i0:hi - i0], labels[lo:hi], lo - b0)
                    del static
        return [acc.result() for acc in out]

    def _check(self, masks, images, labels, perturbations):
        N = self.neurons.size
        if masks.dim() != 2 or masks.shape[1] != N or masks.shape[0] < 1:
            raise UserError(f"masks must be [K, {N}] (K >= 1), got {tuple(masks.shape)}")
        if images.dim() < 2 or labels.dim() != 1 or labels.shape[0] != images.shape[0] or images.shape[0] < 1:
            raise UserError(f"images [B, ...] and labels [B] must match, got {tuple(images.shape)} and "
                            f"{tuple(labels.shape)}")
        if perturbations is not None and not isinstance(self.neurons, NeuronSet):
            raise UserError("perturbations apply to a BN neuron set; with group masks, fold them into the masks")
        if perturbations is not None and perturbations.d_gamma.shape[1] != N:
            raise UserError(f"perturbations must be [P, {N}], got {tuple(perturbations.d_gamma.shape)}")
        masks = masks.to(self.device, torch.float32)
        top = self.neurons.max_value
        if not bool(((masks >= 0) & (masks <= top)).all()):
            raise UserError("mask values must lie in [0, 1]" if top == 1 else "mask values must be finite and >= 0")
        return masks, images.to(self.device, torch.float32), labels.to(self.device, torch.int64)

    def _perturbation_factors(self, perturbations):
        """[(gamma factors, beta factors)] per setting: {module: [C]} (None for setting 0)."""
        out = [None]
        if perturbations is not None:
            g = self.neurons.module_masks(1 + perturbations.d_gamma.to(self.device, torch.float32), self.channels)
            b = self.neurons.module_masks(1 + perturbations.d_beta.to(self.device, torch.float32), self.channels)
            out += [({n: t[p] for n, t in g.items()}, {n: t[p] for n, t in b.items()})
                    for p in range(perturbations.count)]
        return out

    @staticmethod
    def _scale_shift(plan: ModelPlan, module_masks: dict, factors: list, si: int):
        """{bn name: [K, C]} scale and shift of eval BN with the mask (and setting si's perturbation) folded in."""
        scale, shift = {}, {}
        for name, m in module_masks.items():
            bn = plan.bns[name]
            inv = torch.rsqrt(bn.running_var.float() + bn.eps)
            gamma = bn.weight if bn.weight is not None else torch.ones_like(inv)
            beta = bn.bias if bn.bias is not None else torch.zeros_like(inv)
            if factors[si] is not None:
                gamma = gamma * factors[si][0][name]
                beta = beta * factors[si][1][name]
            s = gamma * inv
            t = beta - bn.running_mean * s
            scale[name] = (m * s).contiguous()
            shift[name] = (m * t).contiguous()
        return scale, shift


def _keep_sets(m: torch.Tensor, multiple: int = 8, dense_above: float = 0.8) -> list:
    """m [K, C] -> per mask the channels to compute [C'] int64 (increasing), or None to run the layer dense.
    The survivors are padded with pruned channels (their BN output is exactly 0) up to a multiple of
    `multiple`: oneDNN's channels-last kernels run odd channel counts markedly slower. Dense (None) when all
    or none survive, or when more than `dense_above` of the channels would be computed anyway: slicing the
    weights then costs more than the few skipped channels save (the masks RL samples prune a few percent)."""
    nz = m != 0
    counts = nz.sum(1).tolist()
    C = m.shape[1]
    out = []
    for k in range(m.shape[0]):
        want = -(-counts[k] // multiple) * multiple
        if counts[k] == 0 or want >= C or want > dense_above * C:
            out.append(None)
            continue
        order = torch.argsort((~nz[k]).to(torch.int8), stable=True)  # survivors first, then pruned
        out.append(order[:want].sort().values)
    return out


class _Accumulator:
    """One image part's RewardResult, filled chunk by chunk: add(model, setting, first mask, logits [Kc, b, c],
    labels [b], first image) runs the fused epilogue on the part's images first image .. + b and adds its sums
    (nothing for b = 0)."""

    def __init__(self, models: int, settings: int, k: int, images: int, keep_logits: bool):
        self.shape, self.images, self.keep_logits = (models, settings, k), images, keep_logits
        self.correct = torch.zeros(self.shape, dtype=torch.int64)
        self.ce = torch.zeros(self.shape, dtype=torch.float64)
        self.prob = torch.zeros(self.shape, dtype=torch.float64)
        self.counts = self.logits = None

    def add(self, mi: int, si: int, k0: int, logits: torch.Tensor, labels: torch.Tensor, i0: int = 0) -> None:
        classes = logits.shape[-1]
        if self.counts is None:
            self.counts = torch.zeros(*self.shape, classes, dtype=torch.int64)
            if self.keep_logits:
                self.logits = torch.zeros(*self.shape, self.images, classes)
        if self.images == 0 or len(labels) == 0:
            return
        k1 = k0 + logits.shape[0]
        out = reward_epilogue(logits, labels)
        self.correct[mi, si, k0:k1] += out.correct.cpu()
        self.ce[mi, si, k0:k1] += out.ce_sum.cpu()
        self.counts[mi, si, k0:k1] += out.counts.cpu()
        self.prob[mi, si, k0:k1] += out.prob_sum.cpu()
        if self.keep_logits:
            self.logits[mi, si, k0:k1, i0:i0 + len(labels)] = logits.float().cpu()

    def result(self) -> RewardResult:
        return RewardResult(self.correct, self.ce, self.counts, self.logits, self.prob)


class _eval:
    """Context manager: the model in eval mode, its previous training flags restored afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag
