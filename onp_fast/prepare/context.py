"""prepare(): what every defense shares on one model and defense set, computed once and timed per phase."""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn

from ..data import stratified_split
from ..errors import UserError
from ..groups import NeuronGroups, find_groups
from ..memory import DEFAULT_MAX_MEMORY, MODEL_COPIES, format_bytes, micro_batch, parse_memory, reserved_bytes
from ..progress import note
from ..reward import MaskScorer, RewardWeights, check_backend
from ..torchutil import DEFAULT_DEVICE, check_device, check_precision
from .perturb import adversarial_perturbations
from .trigger import (DEFAULT_FAMILIES, DEFAULT_PURIFY_FAMILIES, FAMILIES, MAX_CLASSES, ProxySet, TriggerProxy,
                      resolve_setting, synthesize_proxies, tile_side, trigger_setting)
from .unlearn import unlearn


PURIFY_MODES = ("auto", "none", "sam", "proxy", "sam+proxy")  # auto: the method's own default (Defense.purify)
UNLEARN_BATCH = 128  # images per step of prepare's unlearning
UNLEARN_EPOCHS = 20  # the most epochs of prepare's unlearning at full effort (it stops earlier at its target)
PURIFY_EPOCHS = 10  # purification epochs at full effort
PURIFY_ROUNDS = 2  # with tile proxies: purification's rounds (docs/design.md, "Refitting the tile proxies")


@dataclass
class RepairConfig:
    """Settings shared by every defense: the split, the shared preparation, the reward the depth rule maximises,
    the depth rule itself, and what repair does after it. A method's own settings live in its Config
    (ONP's policy and RL in ONPConfig)."""

    seed: int = 0
    weights: RewardWeights = field(default_factory=RewardWeights)
    tolerance: float = 0.02  # CA_B drop allowed on D_val by the depth rule (and purification's guard)
    tolerance_auto: bool = True  # raise the tolerance to one D_val image when D_val is too small to resolve it
    slack: float | None = None  # depth rule margin below the best D_val reward; None: one standard error
    val_fraction: float = 0.2
    reward_batch: int = 128  # images of D_opt scored per reward call (a fixed seeded subset)
    reward_backend: str = "engine"  # engine (batched RewardEngine) or hooks (one hooked forward per mask; reference)
    reward_sequential: float = 0.0  # the policy's sequential test: share of the images in its first look (0: off)
    precision: str = "float32"  # the policy's masks' and purification's forwards (autocast); decisions stay float32
    perturbations: int = 2  # adversarial neuron perturbations for CA_P (when its weight is not 0)
    perturb_eps: float = 0.4
    unlearn_lr: float = 0.01
    unlearn_epochs: int | None = None  # unlearning's most epochs; None: UNLEARN_EPOCHS (`repair` CLI: with_effort)
    anomaly_threshold: float = 2.0  # the trigger proxy drives CA_T only when its class stands out this far (MAD)
    trigger_steps: int | None = None  # the proxies' Adam steps; None: trigger_setting's (`repair` CLI: with_effort)
    trigger_batch: int | None = None  # images per class per step; None: trigger_setting's (CLI: with_effort)
    trigger_lr: float | None = None  # the proxies' Adam learning rate; None: trigger_setting's
    trigger_classes: int = MAX_CLASSES  # classes whose proxies are optimised; more are screened first
    trigger_families: tuple[str, ...] = DEFAULT_FAMILIES  # proxy families (prepare.trigger.FAMILIES)
    purify_families: tuple[str, ...] = DEFAULT_PURIFY_FAMILIES  # synthesised for purification only (never the suspect)
    tile_proxies: bool | None = None  # a tiled model (a ViT): longer patch family, tile proxies (trigger.py); None:
    # on (`repair` CLI: with_effort, on at full effort only)
    purify: str = "auto"  # after the depth rule: auto, none, sam, proxy or sam+proxy (onp_fast.repair.purify)
    purify_epochs: int | None = None  # None: PURIFY_EPOCHS (`repair` CLI: with_effort)
    purify_rounds: int = PURIFY_ROUNDS  # with tile proxies: rounds of purification, the proxies refitted between
    purify_lr: float = 0.003
    sam_rho: float = 0.5  # radius of purification's adaptive sharpness-aware step
    purify_clip: float = 5.0  # largest gradient norm of a purification step (0: not clipped)
    purify_distill: bool = True  # the defense images' own loss: distillation from the model as given
    purify_hard: float = 0.0  # share of the true labels' cross-entropy mixed into that distillation loss
    purify_labels_where_wrong: bool = False  # an image the model as given misclassifies is fit to its label instead
    purify_every_family: bool = False  # each image gets a proxy copy per family (else one over every family)
    purify_cosine: bool = False  # the purification rate anneals from purify_lr to 0 over its steps (else constant)
    purify_path: float = 0.0  # path-aware step a > -1: gradients at w0 + (1 + a)(w - w0) (finetune_pruned; 0: off)
    finetune_epochs: int = 0  # clean fine-tuning on the defense set after pruning, pruned groups held at zero
    compact: bool = False  # also build the compact model (pruned channels removed)
    device: str = DEFAULT_DEVICE  # where every phase runs: cpu, cuda or cuda:N (results come back on the CPU)
    max_memory: int | str | None = None  # the whole process's budget (bytes, "512MB"); None: none
    reserved_memory: int = 0  # of max_memory, kept for weights and the runtime (for_model); the rest: activations
    weight_copies: int = MODEL_COPIES  # copies of the model's weights reserved_memory keeps room for (compare: more)

    def check(self) -> "RepairConfig":
        """UserError (one line) for a setting no repair can run with; checked before any work. The device is
        written back in torch's spelling ("CUDA:0" -> "cuda:0")."""
        check_backend(self.reward_backend)
        if not 0 <= self.reward_sequential < 1:
            raise UserError(f"reward_sequential is a share of the images in [0, 1): got {self.reward_sequential}")
        self.device = str(check_device(self.device))
        check_precision(self.precision, self.device)
        if self.max_memory is not None:
            parse_memory(self.max_memory)
        if self.purify not in PURIFY_MODES:
            raise UserError(f"unknown purification {self.purify!r}: use one of {', '.join(PURIFY_MODES)}")
        if self.purify_rounds < 1:
            raise UserError(f"purify_rounds must be at least 1, not {self.purify_rounds}")
        if (self.purify_epochs or 0) < 0 or self.finetune_epochs < 0:
            raise UserError("purification and fine-tuning epochs must not be negative")
        if self.unlearn_epochs is not None and self.unlearn_epochs < 1:
            raise UserError(f"unlearn_epochs must be at least 1 (or None: by the methods' effort), not "
                            f"{self.unlearn_epochs}")
        if not 0 <= self.purify_hard <= 1:
            raise UserError(f"purify_hard is a share in [0, 1]: got {self.purify_hard}")
        if not self.purify_lr > 0 or not self.purify_clip >= 0:
            raise UserError("the purification learning rate must be positive and its gradient clip not negative")
        if not (math.isfinite(self.purify_path) and self.purify_path > -1):
            raise UserError(f"purify_path places each step's gradient at w0 + (1 + a)(w - w0), a > -1: got "
                            f"{self.purify_path}")
        if not (math.isfinite(self.tolerance) and self.tolerance <= 1):  # negative: no change is allowed at all
            raise UserError(f"the tolerance is a drop in accuracy, a fraction up to 1: got {self.tolerance}")
        if self.trigger_lr is not None and not (math.isfinite(self.trigger_lr) and self.trigger_lr > 0):
            raise UserError(f"trigger_lr must be a positive number, not {self.trigger_lr}")
        for key in ("trigger_steps", "trigger_batch"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise UserError(f"{key} must be at least 1 (or None: by the methods' effort), not {getattr(self, key)}")
        if self.weight_copies < 1:
            raise UserError(f"weight_copies must be at least 1, not {self.weight_copies}")
        if self.trigger_classes < 2:
            raise UserError(f"trigger_classes must be at least 2, not {self.trigger_classes}")
        self.trigger_families = check_families(self.trigger_families)
        self.purify_families = check_purify_families(self.purify_families)
        if not 0 < self.val_fraction < 1:
            raise UserError(f"the held-out fraction must lie in (0, 1): got {self.val_fraction}")
        if not all(math.isfinite(v) for v in self.weights.to_dict().values()):
            raise UserError(f"reward weights must be finite: got {self.weights.to_dict()}")
        return self

    @property
    def activation_memory(self) -> int | None:
        """The activation budget every phase splits its batches to: max_memory less reserved_memory (None: no
        budget)."""
        return None if self.max_memory is None else parse_memory(self.max_memory) - self.reserved_memory

    def for_model(self, model: nn.Module) -> "RepairConfig":
        """The config with reserved_memory set for `model` (`memory.reserved_bytes`: the runtime and
        weight_copies copies of its weights), so the whole process stays within max_memory; UserError when that
        leaves the activations nothing (naming the budget it needs). No budget: unchanged."""
        if self.max_memory is None:
            return self
        budget, keep = parse_memory(self.max_memory), reserved_bytes(model, self.weight_copies)
        if budget <= keep:
            raise UserError(f"max_memory {format_bytes(budget)} is too small for this model: its weights, their "
                            f"copies and the runtime take about {format_bytes(keep)}, leaving nothing to the "
                            f"activations (raise --max-memory)")
        return replace(self, reserved_memory=keep)

    def for_defense_set(self, y: torch.Tensor, num_classes: int) -> "RepairConfig":
        """Checks the defense set (labels y [N]) and returns the config with the tolerance its held-out part can
        resolve (`resolve_tolerance`); what `prepare` runs first, and what a caller runs to fail before any
        work."""
        check_defense_set(y, num_classes)
        _, i_val = stratified_split(y.cpu(), self.val_fraction, self.seed)
        return self.resolve_tolerance(len(i_val))

    def resolve_tolerance(self, n_val: int) -> "RepairConfig":
        """The config the depth rule can honour on `n_val` held-out images: one image changes their accuracy by
        1 / n_val, so a tolerance between 0 and that is silently the same as 0. tolerance_auto: raised to
        1 / n_val (the report says so); else a UserError naming the defense size that resolves it."""
        step = 1.0 / max(n_val, 1)
        if self.tolerance >= step - 1e-12 or self.tolerance <= 0:  # 0 (or less): no image may be lost, exactly
            return self
        if not self.tolerance_auto:
            need = math.ceil(1 / max(self.tolerance, 1e-9) / self.val_fraction)
            raise UserError(f"{n_val} held-out defense images cannot resolve a tolerance of {self.tolerance} (one "
                            f"image is {step:.4f}): use about {need} defense images or a tolerance >= {step:.4f}")
        return replace(self, tolerance=step)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weights"] = self.weights.to_dict()
        return d


@dataclass
class DefenseContext:
    """What every defense shares on one model and defense set, so ONP and the baselines see the same data, split
    and depth rule: `model` (a frozen eval copy), the split D_opt / D_val (normalised images [n, C, H, W], labels
    [n]), the neuron groups, the unlearned copy (None once a run that shares the context with no later one has
    ranked and cut: `repair.run`'s `last`), every class's trigger proxies (`proxies`), the most suspect one
    (`proxy`, flagged or not; `trigger` is it when flagged, else None) and the adversarial perturbations [P, G]
    (None when CA_P is off); `times`: seconds per phase. The model, its copies, the images and the proxies live
    on cfg.device; the groups, the perturbations and what defenses return live on the CPU."""

    model: nn.Module
    num_classes: int
    cfg: RepairConfig
    x_opt: torch.Tensor
    y_opt: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    groups: NeuronGroups
    unlearned: nn.Module | None
    unlearn_info: dict
    trigger: TriggerProxy | None
    perturbations: torch.Tensor | None
    times: dict
    progress: bool = True
    proxy: TriggerProxy | None = None
    proxies: ProxySet | None = None

    def phase(self, name: str) -> "Phase":
        return Phase(name, self.times, self.progress)

    @contextlib.contextmanager
    def own_times(self):
        """Within the block, phases are timed into a fresh dict (yielded) instead of the shared `times`, which is
        left as it was: one method's phases apart from the shared preparation's."""
        shared, own = self.times, {}
        self.times = own
        try:
            yield own
        finally:
            self.times = shared

    def defense_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All the defense images (D_opt then D_val) [N, C, H, W] and their labels [N]."""
        return torch.cat([self.x_opt, self.x_val]), torch.cat([self.y_opt, self.y_val])

    def scorer(self, on: str = "opt") -> MaskScorer:
        """The reward (onp.md section 5) on the fixed seeded D_opt subset of `reward_batch` images (on="opt") or
        on all of D_val (on="val"), computed by the `reward_backend`; the sequential test (`reward_sequential`,
        against the depth rule's `tolerance`) and the `precision` on D_opt only: the depth rule scores every depth
        on every image at float32."""
        if on == "val":
            x, y = self.x_val, self.y_val
        else:
            gen = torch.Generator().manual_seed(self.cfg.seed)
            sub = torch.randperm(len(self.x_opt), generator=gen)[: self.cfg.reward_batch].to(self.x_opt.device)
            x, y = self.x_opt[sub], self.y_opt[sub]
        return MaskScorer(self.groups, self.model, x, y, self.cfg.weights, self.unlearned, self.perturbations,
                          self.trigger, backend=self.cfg.reward_backend,
                          max_memory=(DEFAULT_MAX_MEMORY if self.cfg.activation_memory is None
                                      else self.cfg.activation_memory),
                          sequential=self.cfg.reward_sequential if on == "opt" else 0.0, tolerance=self.cfg.tolerance,
                          precision=self.cfg.precision if on == "opt" else "float32")


MIN_DEFENSE_IMAGES = 10  # a defense set may hold fewer images than classes (1,000 classes) but not fewer than this


def check_defense_set(y: torch.Tensor, num_classes: int) -> None:
    """UserError for a defense set (labels y [N]) no defense can run on: empty, fewer images than
    min(classes, MIN_DEFENSE_IMAGES) (a model of many classes may be repaired with images of some of them only;
    stratified_split still gives both parts images), or labels out of range."""
    if len(y) == 0:
        raise UserError("the defense set is empty")
    if len(y) < min(num_classes, MIN_DEFENSE_IMAGES):
        raise UserError(f"the defense set has {len(y)} images, fewer than "
                        + (f"the {num_classes} classes" if num_classes <= MIN_DEFENSE_IMAGES
                           else f"the {MIN_DEFENSE_IMAGES} a defense needs"))
    if y.min() < 0 or y.max() >= num_classes:
        raise UserError(f"defense labels must lie in [0, {num_classes - 1}]")


def checked_config(x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: RepairConfig | None) -> RepairConfig:
    """UserError for a defense set (x [N, C, H, W], y [N]) or a config no repair can run with -> the config
    checked and fit to the defense set (`RepairConfig.for_defense_set`)."""
    if len(x) != len(y):
        raise UserError(f"the defense set has {len(x)} images but {len(y)} labels")
    return (cfg or RepairConfig()).check().for_defense_set(y, num_classes)


def checked_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                   cfg: RepairConfig | None, copy_model: bool = True) -> tuple[nn.Module, RepairConfig]:
    """What every run on a defense set (x [N, C, H, W], y [N]) starts with: UserError for inputs or a config no
    repair can run with -> (a frozen eval copy of `model` on cfg.device, the config checked and fit to the
    defense set). copy_model False: `model` itself is frozen, put in eval mode and moved (no copy of its
    weights; the caller hands it over)."""
    cfg = checked_config(x, y, num_classes, cfg).for_model(model)
    return (copy.deepcopy(model) if copy_model else model).eval().requires_grad_(False).to(cfg.device), cfg


def check_training_budget(model: nn.Module, x: torch.Tensor, batches: dict[str, tuple[int, int | None]],
                          cfg: RepairConfig) -> None:
    """UserError (one line, naming the phase and the budget it needs) when one of `batches` ({what: (images of
    one training step, the fewest a micro-batch of it may hold: the step itself where it is never split; None: a
    training-mode step's, `memory.train_mode_min`)} does
    not fit the activation budget (`RepairConfig.activation_memory`; cfg fit to `model` by `for_model`) even in
    its smallest micro-batch (`memory.micro_batch`, estimated on x [N, C, H, W], images shaped like the defense
    set's). Callers run it before any long work."""
    for what, (batch, smallest) in batches.items():
        micro_batch(model, x, batch, cfg.activation_memory, what, min_size=smallest)


def prepare(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: RepairConfig | None = None,
            progress: bool = True, copy_model: bool = True) -> DefenseContext:
    """Split, groups, unlearning, trigger proxy and perturbations on a frozen copy of `model`, timed per phase,
    on cfg.device (the copy and the defense set are moved there; random draws stay on CPU generators, so a seed
    gives the same draws on every device) and within cfg.max_memory (`unlearn`, `synthesize_proxies`,
    `adversarial_perturbations`). x [N, C, H, W] normalised float32, y [N] int64 (any device): the clean defense
    set, the only data a defense sees.
    The trigger proxies are synthesised when CA_T has weight or purification may use them; the suspect is flagged
    (steers the reward) only when its class stands out by `anomaly_threshold` (Neural Cleanse's rule);
    perturbations are found when CA_P has weight. copy_model False: `model` itself becomes the frozen copy
    (`checked_inputs`); the caller must not use it afterwards."""
    model, cfg = checked_inputs(model, x, y, num_classes, cfg, copy_model)
    torch.manual_seed(cfg.seed)
    times: dict[str, float] = {}
    with Phase("split", times, progress):
        i_opt, i_val = (i.to(cfg.device) for i in stratified_split(y.cpu(), cfg.val_fraction, cfg.seed))
        x, y = x.to(cfg.device), y.to(cfg.device)
        x_opt, y_opt, x_val, y_val = x[i_opt], y[i_opt], x[i_val], y[i_val]
    with Phase("groups", times, progress):
        groups = find_groups(model, tuple(x.shape[1:]))
    with Phase("unlearn", times, progress):
        unlearned, unlearn_info = unlearn(model, x_opt, y_opt, lr=cfg.unlearn_lr, batch_size=UNLEARN_BATCH,
                                          max_epochs=UNLEARN_EPOCHS if cfg.unlearn_epochs is None
                                          else cfg.unlearn_epochs,
                                          seed=cfg.seed, progress=progress, max_memory=cfg.activation_memory)
    with Phase("trigger", times, progress):
        need = cfg.weights.ca_t or cfg.purify != "none"
        proxies = (synthesize_proxies(model, x_opt, y_opt, num_classes,
                                      **trigger_settings(cfg, x_opt.shape, model), progress=progress,
                                      max_memory=cfg.activation_memory)
                   if need else None)
    proxy = proxies.suspect() if proxies is not None else None
    trigger = proxy if proxy is not None and proxy.anomaly_index >= cfg.anomaly_threshold else None
    with Phase("perturbations", times, progress):
        perts = (adversarial_perturbations(model, groups, x_opt, y_opt, count=cfg.perturbations,
                                           eps=cfg.perturb_eps, seed=cfg.seed, progress=progress,
                                           max_memory=cfg.activation_memory)
                 if cfg.weights.ca_p else None)
    return DefenseContext(model, num_classes, cfg, x_opt, y_opt, x_val, y_val, groups, unlearned, unlearn_info,
                          trigger, perts, times, progress, proxy, proxies)


def trigger_settings(cfg: RepairConfig, shape, model: nn.Module | None = None) -> dict:
    """synthesize_proxies' keywords under cfg for images of shape [..., H, W]: seed, steps, batch and lr
    (trigger_steps, trigger_batch, trigger_lr; each None: full effort, `trigger_setting(shape)`), max_classes,
    families (trigger_families, and purify_families unless cfg.purify is "none"), detect (trigger_families:
    only they may name the suspect), tile: `model`'s tile side (`tile_side`) unless cfg.tile_proxies is
    False (None: on), else None (and None without a model), and tile_fit: whether the tile proxies themselves
    are fitted (purification's alone: not when cfg.purify is "none")."""
    both = set(cfg.trigger_families) | set(cfg.purify_families if cfg.purify != "none" else ())
    steps, batch, lr = resolve_setting(shape, cfg.trigger_steps, cfg.trigger_batch, cfg.trigger_lr)
    return {"seed": cfg.seed, "steps": steps, "batch": batch, "lr": lr,
            "max_classes": cfg.trigger_classes, "families": tuple(f for f in FAMILIES if f in both),
            "detect": cfg.trigger_families,
            "tile": tile_side(model) if model is not None and cfg.tile_proxies is not False else None,
            "tile_fit": cfg.purify != "none"}


def trigger_run(cfg: RepairConfig, shape) -> dict:
    """The optimisation `trigger_settings(cfg, shape)` asks for, as reports give it: {"steps", "batch", "lr"}."""
    return dict(zip(("steps", "batch", "lr"), resolve_setting(shape, cfg.trigger_steps, cfg.trigger_batch,
                                                               cfg.trigger_lr)))


def _family_names(families) -> list[str]:
    """A sequence of names, or one comma-separated string -> the names, stripped, in the order given."""
    return [f.strip() for f in (families.split(",") if isinstance(families, str) else families)]


def check_families(families) -> tuple[str, ...]:
    """Proxy family names (a sequence, or one comma-separated string) -> a tuple in FAMILIES' order; UserError
    (one line) for none, an unknown one or a repeated one."""
    names = _family_names(families)
    unknown = [f for f in names if f not in FAMILIES]
    if unknown or not names or len(set(names)) < len(names):
        raise UserError(f"trigger families must be distinct names among {', '.join(FAMILIES)}: got "
                        f"{','.join(names) or 'none'}")
    return tuple(f for f in FAMILIES if f in names)


def check_purify_families(families) -> tuple[str, ...]:
    """RepairConfig.purify_families as given (a sequence, or one comma-separated string; empty or "none": no
    family) -> `check_families`' tuple, () for none; UserError (one line) as check_families."""
    names = _family_names(families)
    return () if [f.lower() for f in names if f] in ([], ["none"]) else check_families(names)


def with_effort(cfg: RepairConfig, efforts, shape) -> RepairConfig:
    """cfg with the work of the shared phases and of purification resolved where it is None, for images of shape
    [..., H, W] whose full-effort trigger setting is (S, B, lr) = `trigger_setting(shape)`, from e = the
    largest of `efforts` (each in (0, 1], the share of its method's default work a run asks for:
    `Defense.effort`; None entries have no say; 1 when none has): trigger steps = ceil(S x e), at least 1;
    trigger batch = ceil(S x B x e / steps), between 2 and B (so the proxies' images per class, steps x batch,
    follow e); trigger lr = lr; unlearning's most epochs ceil(UNLEARN_EPOCHS x e) and purification's epochs
    ceil(PURIFY_EPOCHS x e), each at least 1; tile proxies (a tiled model's longer patch family and tile proxies,
    several times the trigger phase's work, which has no short form) only at e = 1. A short run (one RL iteration
    of two masks) has short phases, the defaults the full ones. A setting made by hand is kept (trigger steps
    set by hand keep the batch set by hand, else B). `onp-fast repair` applies it with its method's effort;
    the library's repair and compare take the config as given (None: the full phase), so a compare row stays
    what repair gives with the same config."""
    effort = min(1.0, max([float(e) for e in efforts if e is not None] or [1.0]))

    def share(full: int) -> int:
        return max(1, math.ceil(full * effort - 1e-9))

    full_steps, full_batch, full_lr = trigger_setting(shape)
    done = {"unlearn_epochs": share(UNLEARN_EPOCHS) if cfg.unlearn_epochs is None else cfg.unlearn_epochs,
            "purify_epochs": share(PURIFY_EPOCHS) if cfg.purify_epochs is None else cfg.purify_epochs,
            "trigger_lr": full_lr if cfg.trigger_lr is None else cfg.trigger_lr,
            "tile_proxies": effort >= 1.0 if cfg.tile_proxies is None else cfg.tile_proxies}
    if cfg.trigger_steps is not None:  # set by hand: the batch too, or the full one
        return replace(cfg, trigger_batch=full_batch if cfg.trigger_batch is None else cfg.trigger_batch, **done)
    steps = share(full_steps)
    batch = cfg.trigger_batch if cfg.trigger_batch is not None else \
        min(full_batch, max(2, math.ceil(full_steps * full_batch * effort / steps - 1e-9)))
    return replace(cfg, trigger_steps=steps, trigger_batch=batch, **done)


class Phase:
    """`with Phase(name, times, progress):` prints "[onp] name ..." on stderr (when progress; above any progress
    bar, onp_fast.progress.note) and records the block's seconds in times[name]."""

    def __init__(self, name: str, times: dict, progress: bool):
        self.name, self.times, self.progress = name, times, progress

    def __enter__(self):
        self.t0 = time.perf_counter()
        if self.progress:
            note(f"[onp] {self.name} ...")
        return self

    def __exit__(self, *exc):
        self.times[self.name] = round(time.perf_counter() - self.t0, 3)
        return False
