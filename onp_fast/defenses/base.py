"""The Defense interface: every defense ranks the neuron groups of a prepared context (onp_fast.prepare).

A defense's `scores(ctx)` gives each of the G groups a score (higher = prune first); the shared held-out depth
rule (onp_fast.repair) chooses how many to prune. A score of -inf marks a group the method cannot or must not
prune (FP: outside the last conv layer); those groups are never pruned. `after` is an optional last step on the
pruned model (FP's fine-tune). Methods register themselves in METHODS; `get` builds one by name.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import asdict

import torch
import torch.nn as nn

from ..errors import UserError
from ..prepare import DefenseContext, RepairConfig


class Defense:
    """A defense. Subclasses set `name`, `title`, `Config` (a dataclass of the method's own hyper-parameters with
    the published defaults; None when the method has none) and implement `scores`."""

    name: str = ""
    title: str = ""
    Config: type | None = None
    prunes: bool = True  # False: a fine-tuning defense; its scores are ignored and the depth is 0
    purify: str = "none"  # the purification after pruning when RepairConfig.purify is "auto"
    splits_training: bool = False  # its own training steps run through finetune_pruned (micro-batched)

    def __init__(self, config=None):
        if config is not None and self.Config is not None and not isinstance(config, self.Config):
            raise UserError(f"{self.name}: config must be a {self.Config.__name__}")
        self.config = config if config is not None else (self.Config() if self.Config is not None else None)
        check = getattr(self.config, "check", None)
        if check is not None:  # a bad setting fails here, before any work
            check()

    def config_dict(self) -> dict:
        return asdict(self.config) if self.config is not None else {}

    def scores(self, ctx: DefenseContext) -> tuple[torch.Tensor, dict]:
        """-> (scores [G] float32, higher = prune first, -inf = never prune; a JSON-able report part)."""
        raise NotImplementedError

    def train_batch(self) -> int | None:
        """Images in one training step of the method's own scoring or last step: its Config's `batch_size` (FP's
        and FT-SAM's fine-tune, micro-batched under a memory budget that cannot hold it: `splits_training`;
        ANP's and RNP's mask optimisation, kept whole); an upper bound (a smaller defense set gives smaller
        batches, except ANP, which draws it with replacement). None when the method trains with no such batch."""
        return getattr(self.config, "batch_size", None)

    def effort(self) -> float | None:
        """The share in (0, 1] of the method's default work its Config asks for, by which `onp-fast repair`
        scales the shared trigger phase (`prepare.with_effort`); None: the method has no say (it does not read
        the proxies), and the phase is the full one."""
        return None

    def after(self, ctx: DefenseContext, model: nn.Module, prune: torch.Tensor) -> dict:
        """A step after pruning, in place on `model` (the pruned copy; prune [G] bool) -> its report part. The
        default does nothing."""
        return {}


METHODS: dict[str, type[Defense]] = {}  # name -> Defense class, in table order
_ORDER = ("onp", "fp", "anp", "rnp", "clp", "ftsam")


def register(cls: type[Defense]) -> type[Defense]:
    """Adds a Defense class to METHODS (kept in _ORDER, others after), whatever the import order."""
    METHODS[cls.name] = cls
    ordered = sorted(METHODS.items(), key=lambda kv: _ORDER.index(kv[0]) if kv[0] in _ORDER else len(_ORDER))
    METHODS.clear()
    METHODS.update(ordered)
    return cls


def get(method, config=None) -> Defense:
    """A Defense instance as given, or the defense called `method` (one of METHODS) with `config` (None: the
    published defaults)."""
    if isinstance(method, Defense):
        return method
    key = str(method).strip().lower()
    if key not in METHODS:
        raise UserError(f"unknown defense method {method!r}: use one of {', '.join(METHODS)}")
    return METHODS[key](config)


_MINIMUM = {("*", "batch_size"): 1, ("onp", "iterations"): 1, ("onp", "samples"): 2,
            ("repair", "reward_batch"): 1, ("repair", "val_fraction"): 0.01}


_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _kind(value, annotation) -> type | None:
    """The type a "FIELD=VALUE" text becomes for a config field holding `value`, annotated `annotation`: the
    value's own type (int, float, str, bool, tuple); for a field left None, str when it may hold a string (e.g.
    max_memory: None or a size), else int when it may hold one (e.g. purify_epochs: None, by the run's effort),
    else float (e.g. trigger_lr: None, by the image size), else bool (e.g. tile_proxies: None, by the run's
    effort); None for a field no text sets."""
    if type(value) in (int, float, str, bool, tuple):
        return type(value)
    if value is None:
        names = set(re.findall(r"\w+", str(annotation)))  # "int | None" -> {"int", "None"}
        return next((kind for kind in (str, int, float, bool) if kind.__name__ in names), None)
    return None


def apply_params(items, methods, cfg: RepairConfig | None = None) -> tuple[RepairConfig, dict]:
    """Hyper-parameter overrides "METHOD.FIELD=VALUE" (a field of that method's Config; METHOD among `methods`)
    or "repair.FIELD=VALUE" (a number/text/true-false field of the shared RepairConfig: the split, the reward batch, the
    depth rule's tolerance; or a list of names, comma-separated, checked by RepairConfig.check: e.g.
    repair.trigger_families=patch,blend, repair.purify_families=none) -> (the RepairConfig, {method: Config}). Bad
    items raise UserError."""
    cfg = copy.deepcopy(cfg) if cfg is not None else RepairConfig()
    configs: dict = {}
    for item in items:
        key, eq, text = str(item).partition("=")
        owner, dot, field = key.strip().partition(".")
        if not eq or not dot or not field:
            raise UserError(f"parameter {item!r} must look like METHOD.FIELD=VALUE (or repair.FIELD=VALUE)")
        if owner == "repair":
            target = cfg
        else:
            if owner not in METHODS:
                raise UserError(f"parameter {item!r}: unknown method {owner!r}: use repair or one of "
                                f"{', '.join(METHODS)}")
            if owner not in methods:
                raise UserError(f"parameter {item!r}: {owner} is not among the methods run ({', '.join(methods)})")
            if METHODS[owner].Config is None:
                raise UserError(f"parameter {item!r}: {owner} has no parameters of its own; use repair.FIELD")
            target = configs.setdefault(owner, METHODS[owner].Config())
        kinds = {f.name: _kind(getattr(target, f.name), f.type) for f in dataclasses.fields(target)}
        kinds = {k: v for k, v in kinds.items() if v is not None}
        if field not in kinds:
            raise UserError(f"parameter {item!r}: {owner} has no field {field!r}: use {', '.join(kinds)}")
        kind = kinds[field]
        if kind is tuple:
            setattr(target, field, tuple(n.strip() for n in text.split(",") if n.strip()))
            continue
        if kind is bool:
            if text.strip().lower() not in _BOOLS:
                raise UserError(f"parameter {item!r}: {field} takes true or false")
            setattr(target, field, _BOOLS[text.strip().lower()])
            continue
        try:
            value = kind(text.strip())
        except ValueError:
            raise UserError(f"parameter {item!r}: {field} takes a {kind.__name__}") from None
        if kind is float and not math.isfinite(value):
            raise UserError(f"parameter {item!r}: {field} must be a finite number")
        if kind is not str:
            low = _MINIMUM.get((owner, field), _MINIMUM.get(("*", field), 0))
            if value < low or (owner, field) == ("repair", "val_fraction") and not value < 1:
                raise UserError(f"parameter {item!r}: {field} must be at least {low:g}"
                                + (" and below 1" if field == "val_fraction" else ""))
        setattr(target, field, value)
    return cfg, configs
