"""The Defense interface: every pruning defense is prepare (shared) -> its scores [G] -> finish (shared).

A defense ranks the G neuron groups of `onp_fast.groups` (higher score = prune first); the shared held-out
depth rule (`onp_fast.repair.finish`) chooses how many to prune. A score of -inf marks a group the method
cannot or must not prune (FP: outside the last conv layer); those groups are left out of the depth rule's
candidates and are never pruned. `after` is an optional last step on the pruned model (FP's fine-tune).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import asdict

import numpy as np
import torch
import torch.nn as nn

from ..errors import UserError
from ..groups import Group, NeuronGroups
from ..repair.pipeline import DefenseContext, RepairConfig, RepairResult, finish, prepare


class Defense:
    """A pruning defense. Subclasses set `name`, `title`, `Config` (a dataclass of hyper-parameters with the
    published defaults; None when the method has none of its own) and implement `scores`."""

    name: str = ""
    title: str = ""
    Config: type | None = None

    def __init__(self, config=None):
        if config is not None and self.Config is not None and not isinstance(config, self.Config):
            raise UserError(f"{self.name}: config must be a {self.Config.__name__}")
        self.config = config if config is not None else (self.Config() if self.Config is not None else None)

    def config_dict(self, ctx: DefenseContext) -> dict:
        return asdict(self.config) if self.config is not None else {}

    def scores(self, ctx: DefenseContext) -> tuple[torch.Tensor, dict]:
        """-> (scores [G] float32, higher = prune first, -inf = never prune; a JSON-able report part)."""
        raise NotImplementedError

    def after(self, ctx: DefenseContext, result: RepairResult) -> RepairResult:
        """A step after pruning (in place on result.model); the default does nothing."""
        return result


METHODS: dict[str, type[Defense]] = {}  # name -> Defense class, in table order
_ORDER = ("onp", "fp", "anp", "rnp", "clp")


def register(cls: type[Defense]) -> type[Defense]:
    """Adds a Defense class to METHODS (kept in _ORDER, others after), whatever the import order."""
    METHODS[cls.name] = cls
    ordered = sorted(METHODS.items(), key=lambda kv: _ORDER.index(kv[0]) if kv[0] in _ORDER else len(_ORDER))
    METHODS.clear()
    METHODS.update(ordered)
    return cls


def get(name: str, config=None) -> Defense:
    """The defense called `name` (one of METHODS) with `config` (None: published defaults)."""
    key = str(name).strip().lower()
    if key not in METHODS:
        raise UserError(f"unknown defense method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[key](config)


def apply_defense(method: str | Defense, ctx: DefenseContext) -> RepairResult:
    """Runs one defense on a prepared context: scores -> the shared depth rule -> `after`. The context is not
    changed (compare reuses it for every method). report["method_times_s"]: this method's own phases;
    report["times_s"]: the shared prepare phases and this method's."""
    defense = method if isinstance(method, Defense) else get(method)
    shared = ctx.times
    own: dict[str, float] = {}
    ctx.times = own
    try:
        torch.manual_seed(ctx.cfg.seed)  # each method starts from the same RNG state, whatever ran before
        scores, part = defense.scores(ctx)
        scores = scores.detach().float()
        if scores.shape != (ctx.groups.num_groups,) or torch.isnan(scores).any():
            raise UserError(f"{defense.name} returned scores of shape {list(scores.shape)} (or NaN); "
                            f"expected [{ctx.groups.num_groups}] numbers")
        part = {"method": defense.name, "method_config": defense.config_dict(ctx), **part}
        result = _finish_candidates(ctx, scores, part, defense.name)
        result = defense.after(ctx, result)
    finally:
        ctx.times = shared
    result.report["method_times_s"] = dict(own)
    result.report["times_s"] = {**shared, **own}
    return result


def run_defense(method: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                cfg: RepairConfig | None = None, progress: bool = True, config=None) -> RepairResult:
    """The single entry point for `repair --method`: prepare (split, groups, unlearning, trigger proxy) on the
    clean defense set (x [N, C, H, W] normalised float32, y [N] int64) -> the method's scores -> the shared
    held-out depth rule -> the method's last step. `config`: the method's Config (None: published defaults).
    Never sees test data, triggers or attack specs."""
    defense = get(method, config)
    ctx = prepare(model, x, y, num_classes, cfg, progress)
    return apply_defense(defense, ctx)


_MINIMUM = {("*", "batch_size"): 1, ("repair", "iterations"): 1, ("repair", "samples"): 2,
            ("repair", "reward_batch"): 1, ("repair", "val_fraction"): 0.01}


def apply_params(items, methods, cfg: RepairConfig | None = None) -> tuple[RepairConfig, dict]:
    """Hyper-parameter overrides "METHOD.FIELD=VALUE" (a field of that method's Config; METHOD among `methods`)
    or "repair.FIELD=VALUE" (a number/text field of RepairConfig: ONP's RL, the split, the depth rule's
    tolerance; shared by every method) -> (the RepairConfig, {method: Config}). Bad items raise UserError."""
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
        fields = [f.name for f in dataclasses.fields(target)
                  if type(getattr(target, f.name)) in (int, float, str)]
        if field not in fields:
            raise UserError(f"parameter {item!r}: {owner} has no field {field!r}: use {', '.join(fields)}")
        kind = type(getattr(target, field))
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


def _finish_candidates(ctx: DefenseContext, scores: torch.Tensor, part: dict, name: str) -> RepairResult:
    """`finish` over the candidate groups (score > -inf) only; all groups when none scores -inf."""
    ok = scores > -float("inf")
    if bool(ok.all()):
        return finish(ctx, scores, {**part, "candidates": ctx.groups.num_groups})
    if not bool(ok.any()):
        raise UserError(f"{name} found no neuron group it can score in this model")
    idx = torch.nonzero(ok).flatten()
    sub = restrict_groups(ctx.groups, idx)
    # The last sub-group ("rest": every non-candidate's rows, no mask point) ranks last. Pruning it changes no
    # output, only the sparsity term, so with a sparsity weight >= 0 the rule never picks it; with a negative
    # weight it may, and the model then has all candidates pruned and nothing else (the report says so).
    sub_scores = torch.cat([scores[idx], torch.tensor([-float("inf")])])
    res = finish(dataclasses.replace(ctx, groups=sub), sub_scores, {**part, "candidates": len(idx)})
    if bool(res.prune[-1]):
        res.report["stopping_rule"]["note"] = "the chosen depth counts the non-candidate placeholder, which " \
                                              "prunes nothing: all candidates are pruned"
    prune = torch.zeros(ctx.groups.num_groups, dtype=torch.bool)
    prune[idx] = res.prune[:-1]
    groups = ctx.groups
    per_layer: dict[str, int] = {}
    for gi in torch.nonzero(prune).flatten().tolist():
        for layer, _ in groups.groups[gi].rows:
            per_layer[layer] = per_layer.get(layer, 0) + 1
    res.report.update(pruned_groups=int(prune.sum()), pruned_per_layer=per_layer)
    kinds = {k: sum(g.kind == k for g in groups.groups) for k in ("channel", "coupled", "head")}
    res.report["groups"] = {"count": groups.num_groups, "layers": len(groups.layers), "kinds": kinds}
    return RepairResult(model=res.model, prune=prune, prune_prob=scores, groups=groups, report=res.report)


def restrict_groups(groups: NeuronGroups, idx: torch.Tensor) -> NeuronGroups:
    """The groups `idx` [K] int64 (re-indexed 0..K-1, same points and rows) plus a last group with no mask point
    that holds the rows of all the others (so the reward's sparsity term, rows pruned / all rows, keeps its
    scale; a row-less group counts as one row there, so it adds one placeholder row)."""
    keep = idx.tolist()
    chosen = set(keep)
    new = [Group(index=i, kind=groups.groups[g].kind, points=list(groups.groups[g].points),
                 rows=list(groups.groups[g].rows)) for i, g in enumerate(keep)]
    rest_rows = []
    for g in groups.groups:
        if g.index not in chosen:
            rest_rows.extend(g.rows if g.rows else [("", -1)])
    new.append(Group(index=len(new), kind="channel", points=[], rows=rest_rows))
    mapping = np.full(groups.num_groups + 1, len(keep), dtype=np.int64)  # old index -> new; -1 stays -1
    mapping[keep] = np.arange(len(keep))
    mapping[-1] = -1

    def remap(a):
        return None if a is None else mapping[a]

    point_dims = {key: (len(groups.point_index(key)), groups.point_dim(key)) for key in groups.point_keys}
    layer_groups = {n: remap(a) for n, a in groups.layer_groups.items()}
    module_channels = {n: (remap(i), remap(o)) for n, (i, o) in groups.module_channels.items()}
    return NeuronGroups(new, groups.layers, layer_groups, point_dims, module_channels)


def pruned_model(ctx: DefenseContext, prune: torch.Tensor) -> nn.Module:
    """A copy of the context's model with the groups prune [G] bool zeroed."""
    return ctx.groups.prune_(copy.deepcopy(ctx.model), ~prune)


def per_group_max(groups: NeuronGroups, values: list[tuple[np.ndarray, torch.Tensor]]) -> torch.Tensor:
    """values: (group of each channel [C] int64, -1 = none; value of each channel [C]) pairs -> [G] float32, the
    max over each group's channels; -inf for a group with no channel."""
    out = torch.full((groups.num_groups,), -float("inf"))
    for gidx, v in values:
        gi = torch.as_tensor(gidx)
        sel = gi >= 0
        if sel.any():
            out.scatter_reduce_(0, gi[sel], v.detach().float()[sel], "amax", include_self=True)
    return out
