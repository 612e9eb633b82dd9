"""compare(): every defense on the same model, defense data, split and seed; one table of CA, ASR, RA, DER,
seconds and re-activation ASR, plus a separate "oracle" table (the depth a test-set choice would give).

`prepare` runs once and its context is shared by every method (same D_opt / D_val, groups, unlearned copy,
trigger proxy); its time is reported apart. A method's seconds are its own scoring, the shared depth rule and
its last step (FP's fine-tune). The oracle never feeds back into the non-oracle numbers.
"""
from __future__ import annotations

import copy
import time
from dataclasses import replace

import torch
import torch.nn as nn

from .defenses import METHODS, get
from .evaluate import evaluate
from .memory import SHARED_COPIES
from .metrics import defense_effectiveness_rating, within_tolerance
from .data import normalize
from .errors import UserError
from .prepare import FINETUNE_BATCH, DefenseContext, RepairConfig, check_training_budget, checked_config, \
    finetune_pruned, prepare
from .prepare.context import PURIFY_MODES
from .repair import RepairResult, run
from .repair.pipeline import memory_part, proxy_part, purify_mode_of, training_batches

ORACLE_RULE = ("lowest test ASR with test CA >= CA before - {tol:g} (fraction), ties to the smaller depth, over "
               "the depths the held-out rule scanned (pruning and the method's own last step; no purification)")
DEFAULT_METHODS = ("onp", "onp/none", "fp", "anp", "rnp", "clp", "ftsam")
RETUNE_BATCH = 128  # images per step of the retuning attack (Min et al.)


def method_spec(text: str) -> tuple[str, str | None]:
    """A compare row: "onp" -> ("onp", None) (the purification RepairConfig gives); "onp/none" -> ("onp", "none")
    (that method with that purification mode). UserError for an unknown method or mode."""
    name, slash, mode = str(text).strip().lower().partition("/")
    name, mode = name.strip(), mode.strip()
    if name not in METHODS:
        raise UserError(f"unknown method {text.strip()!r}: use one of {', '.join(METHODS)} (optionally "
                        f"METHOD/PURIFY)")
    if slash and mode not in PURIFY_MODES:
        raise UserError(f"unknown purification in {text.strip()!r}: use one of {', '.join(PURIFY_MODES)}")
    return name, (mode if slash else None)


def _eval(model, test, attack, target) -> dict:
    """CA / ASR / RA of `model` (on its device) on test = (test_x, test_y, mean, std, max_memory)."""
    test_x, test_y, mean, std, max_memory = test
    with torch.no_grad():
        r = evaluate(model, test_x, test_y, mean, std, attack=attack, target=target, max_memory=max_memory)
    return {k: r[k] for k in ("ca", "asr", "ra")}


def _der(before: dict, after: dict) -> float:
    return defense_effectiveness_rating(before["asr"], after["asr"], before["ca"], after["ca"])


def oracle(defense, ctx: DefenseContext, result: RepairResult, before: dict, test, attack, target,
           tolerance: float) -> dict:
    """Scans the method's ranking on the test set at the depths the held-out rule scanned; picks by ORACLE_RULE,
    then applies the method's last step (FP's fine-tune) at that depth. -> {"depth", "ca", "asr", "ra", "der"}."""
    n_cand = int((result.scores > -float("inf")).sum())
    depths = sorted({r["depth"] for r in result.report["stopping_rule"]["table"] if r["depth"] <= n_cand})
    best = None
    for d in depths:
        prune = _top(result.scores, d)
        r = _eval(ctx.groups.pruned_copy(ctx.model, prune), test, attack, target)
        ok = within_tolerance(r["ca"], before["ca"], tolerance)
        if ok and (best is None or r["asr"] < best[1]["asr"]):
            best = (d, r, prune)
    if best is None:  # depth 0 always passes; kept for models whose CA is 0
        return {"depth": None}
    return at_depth(defense, ctx, result, best[0], before, test, attack, target)


def _top(scores: torch.Tensor, depth: int) -> torch.Tensor:
    """-> [G] bool: the `depth` highest-scored groups (ties to the lower index), never one scored -inf."""
    n_cand = int((scores > -float("inf")).sum())
    prune = torch.zeros(len(scores), dtype=torch.bool)
    prune[torch.argsort(scores, descending=True, stable=True)[:min(depth, n_cand)]] = True
    return prune


def at_depth(defense, ctx: DefenseContext, result: RepairResult, depth: int, before: dict, test, attack,
             target) -> dict:
    """The method's `depth` highest-ranked groups pruned from the model as given, then its last step (FP's
    fine-tune; no purification), on the test set. -> {"depth", "ca", "asr", "ra", "der"}."""
    prune = _top(result.scores, depth)
    model = ctx.groups.pruned_copy(ctx.model, prune)
    with ctx.own_times():
        defense.after(ctx, model, prune)
    r = _eval(model, test, attack, target)
    return {"depth": int(prune.sum()), **r, "der": _der(before, r)}


def retune(model: nn.Module, groups, x: torch.Tensor, y: torch.Tensor, mean, std, attack, target: int, *,
           poisoned: int = 5, epochs: int = 5, seed: int = 0, max_memory: int | str | None = None) -> nn.Module:
    """The retuning attack of Min et al. (NeurIPS 2024) on a copy of `model`: every weight fine-tuned (SGD lr 0.01,
    momentum 0.9, batch 128, `epochs` epochs) on the defense set (x [N, C, H, W] normalised, y [N]) plus
    `poisoned` of its images carrying the trigger: non-target images relabelled to the target (dirty-label
    attacks) or target-class images keeping their label (clean-label attacks). x, y on the model's device (the
    poisoned images are drawn and stamped on the CPU, the same on every device); max_memory: as
    `finetune_pruned`'s. -> the retuned copy."""
    g = torch.Generator().manual_seed(seed)
    yc = y.cpu()
    pool = torch.nonzero(yc == target if attack.clean_label else yc != target).flatten()
    pick = pool[torch.randperm(len(pool), generator=g)[:poisoned]]
    c = x.shape[1]
    m, s = torch.as_tensor(mean).view(1, c, 1, 1), torch.as_tensor(std).view(1, c, 1, 1)
    stamped = normalize(attack.apply((x[pick.to(x.device)].cpu() * s + m).clamp(0, 1)), mean, std).to(x.device)
    xs = torch.cat([x, stamped])
    ys = torch.cat([y, torch.full((len(pick),), target, dtype=y.dtype, device=y.device)])
    none = torch.zeros(groups.num_groups, dtype=torch.bool)
    return finetune_pruned(copy.deepcopy(model), groups, none, xs, ys, epochs=epochs, lr=0.01,
                           batch_size=RETUNE_BATCH, seed=seed, max_memory=max_memory)


def compare(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, *, test_x: torch.Tensor,
            test_y: torch.Tensor, mean, std, attack, target: int, methods=None, cfg: RepairConfig | None = None,
            configs: dict | None = None, reactivation_epochs: int = 10, retune_epochs: int = 5,
            oracle_tolerance: float = 0.02, oracle_table: bool = True, progress: bool = False,
            log=None) -> dict:
    """Runs `methods` (default: DEFAULT_METHODS; each a `method_spec`, e.g. "onp/none") on one prepared context;
    a method listed twice with different purification is scored once.

    x [N, C, H, W] normalised float32, y [N] int64: the clean defense set (the only data the defenses see).
    test_x [M, C, H, W] pixels in [0, 1], test_y [M], mean, std, attack, target: evaluation only.
    configs: {method: its Config} (missing: published defaults). log: optional callable(str) for progress.
    Each row: the method's CA/ASR/RA/DER, its re-activation (`reactivation_epochs` clean epochs, pruned groups
    held at zero; 0: skipped) and the retuning attack (`retune`, `retune_epochs`; 0: skipped), and, with
    `oracle_table`, its "oracle" (`oracle`; computed once per ranking: it never purifies, so "onp/none" has onp's).
    Everything runs on cfg.device within cfg.max_memory (a training step it cannot hold whole runs as
    micro-batches; a budget under a step's smallest micro-batch is an error before any work: `training_batches`,
    the re-activation's and the retuning attack's batches).
    Returns {"before", "prepare_s", "prepare_times_s", "trigger_proxy" (the shared scan's suspect:
    `repair.pipeline.proxy_part`), "rows": [...], "reward_backend", "oracle_rule",
    "peak_memory" (`repair.pipeline.memory_part` at the end)} (fractions, seconds; "oracle_rule" None without
    `oracle_table`); an ONP row also has "policy_reward" (its policy phase's backend, masks/s, images/s)."""
    cfg = cfg or RepairConfig()
    specs = [method_spec(m) for m in (methods or DEFAULT_METHODS)]
    defenses = [get(name, (configs or {}).get(name)) for name, _ in specs]
    cfg = replace(cfg, weight_copies=cfg.weight_copies + SHARED_COPIES)  # what a repair holds, and the shared ones
    cfg = checked_config(x, y, num_classes, cfg).for_model(model)
    batches = training_batches(y, cfg, [(d, purify_mode_of(cfg, d, mode)) for (_, mode), d in zip(specs, defenses)])
    if reactivation_epochs > 0:
        batches["the re-activation fine-tune"] = (min(FINETUNE_BATCH, len(x)), None)
    if retune_epochs > 0:
        batches["the retuning attack"] = (min(RETUNE_BATCH, len(x) + 5), None)
    check_training_budget(model, x, batches, cfg)
    device = torch.device(cfg.device)
    test = (test_x, test_y, mean, std, cfg.activation_memory)
    say = log or (lambda s: None)
    first = next(model.parameters(), None)
    here = first is None or first.device == device  # the CLI's model is on the device already
    before = _eval(model if here else copy.deepcopy(model).to(device), test, attack, target)
    t0 = time.perf_counter()
    ctx = prepare(model, x, y, num_classes, cfg, progress)
    x, y = x.to(device), y.to(device)
    prepare_s = time.perf_counter() - t0
    say(f"prepare (shared): {prepare_s:.1f}s")
    rows, ranked, oracles = [], {}, {}
    for (name, mode), defense in zip(specs, defenses):
        t0 = time.perf_counter()
        res = run(ctx, defense, purify=mode, ranked=ranked.get(name))
        seconds = time.perf_counter() - t0
        if name in ranked:  # its scoring time, measured in the row that scored
            seconds += sum(res.report["scoring_times_s"].values())
        ranked.setdefault(name, res)
        res.model.to(device)  # back on the device for the evaluations below (rows hold numbers only)
        after = _eval(res.model, test, attack, target)
        label = name if mode is None else f"{name}/{mode}"
        row = {"method": label, "title": defense.title, **after, "der": _der(before, after),
               "purify": res.report["purify"],
               "seconds": seconds, "pruned": int(res.prune.sum()), "candidates": res.report["candidates"],
               "groups": ctx.groups.num_groups, "depth_rule": res.report["stopping_rule"]["rule"],
               "ca_val": [res.report["ca_val_before"], res.report["ca_val_after"]],
               "times_s": res.report["method_times_s"], "config": res.report["method_config"]}
        own = res.report["details"]
        if "policy_reward" in own:
            row["policy_reward"] = own["policy_reward"]
        if "seconds_per_iteration" in own:  # ANP's cost per mask iteration
            row["seconds_per_iteration"] = own["seconds_per_iteration"]
        if "own_rule" in own:  # the method's published pruning rule, evaluated like the oracle (never fed back)
            row["own_rule"] = {"rule": own["own_rule"], "groups": own["own_rule_groups"],
                               **at_depth(defense, ctx, res, own["own_rule_groups"], before, test, attack, target)}
        if reactivation_epochs > 0:
            ft = finetune_pruned(copy.deepcopy(res.model), res.groups, res.prune, x, y, epochs=reactivation_epochs,
                                 seed=cfg.seed, max_memory=cfg.activation_memory)
            re = _eval(ft, test, attack, target)
            row["reactivation"] = {"epochs": reactivation_epochs, "ca": re["ca"], "asr": re["asr"]}
        if retune_epochs > 0:
            rt = _eval(retune(res.model, res.groups, x, y, mean, std, attack, target, epochs=retune_epochs,
                              seed=cfg.seed, max_memory=cfg.activation_memory), test, attack, target)
            row["retune"] = {"epochs": retune_epochs, "poisoned": 5, "ca": rt["ca"], "asr": rt["asr"]}
        if oracle_table:
            if name not in oracles:
                oracles[name] = oracle(defense, ctx, res, before, test, attack, target, oracle_tolerance)
            row["oracle"] = oracles[name]
        rows.append(row)
        say(f"{label}: CA {100 * after['ca']:.2f} ASR {100 * after['asr']:.2f} in {seconds:.1f}s")
    return {"before": before, "prepare_s": prepare_s, "prepare_times_s": dict(ctx.times),
            "trigger_proxy": proxy_part(ctx), "rows": rows,
            "defense": {"n": len(x), "n_opt": len(ctx.x_opt), "n_val": len(ctx.x_val), "seed": cfg.seed},
            "reward_backend": cfg.reward_backend,
            "oracle_rule": ORACLE_RULE.format(tol=oracle_tolerance) if oracle_table else None,
            "peak_memory": memory_part(cfg)}


def _suspect_line(part: dict | None) -> str:
    """The shared scan's suspect in words (`proxy_part`)."""
    if part is None:
        return "none synthesised"
    return (f"{part['family']}/{part['target']} at anomaly index {part['anomaly_index']:.2f}, "
            f"{'flagged' if part['flagged'] else 'not flagged'}")


def format_table(result: dict) -> str:
    """The compare result as text: the held-out table, the oracle table, then the own-rule table (percentages,
    seconds). "own rule": the groups the method's own published threshold prunes (ANP, RNP: a mask <= 0.2; CLP:
    u = 3) and what that pruning gives on the test set."""
    b = result["before"]
    pt = ", ".join(f"{k} {v:.1f}" for k, v in result["prepare_times_s"].items())
    lines = [f"before: CA {100 * b['ca']:.2f}  ASR {100 * b['asr']:.2f}  RA {100 * b['ra']:.2f}",
             f"shared prepare: {result['prepare_s']:.1f}s ({pt})",
             f"trigger proxy: {_suspect_line(result.get('trigger_proxy'))}",
             "depth: chosen on held-out defense images (no test data, no trigger)",
             (f"{'method':<9}|{'CA':>7} |{'ASR':>7} |{'RA':>7} |{'DER':>7} |{'seconds':>8} |{'pruned':>12} |"
              f"{'re-act CA / ASR':>16} |{'retune CA / ASR':>16} |{'own rule':>9}")]
    for r in result["rows"]:
        re, rt = (("-" if v is None else f"{100 * v['ca']:.2f} / {100 * v['asr']:.2f}")
                  for v in (r.get("reactivation"), r.get("retune")))
        own = r.get("own_rule", {}).get("groups")
        lines.append(f"{r['method']:<9}|{100 * r['ca']:7.2f} |{100 * r['asr']:7.2f} |{100 * r['ra']:7.2f} |"
                     f"{r['der']:7.4f} |{r['seconds']:8.1f} |{r['pruned']:>5} / {r['candidates']:<4} |"
                     f"{re:>16} |{rt:>16} |{'-' if own is None else own:>9}")
    if result["oracle_rule"] is None:
        lines.append("oracle: not computed")
    else:
        lines.append(f"oracle (test-set depth, for comparison with published numbers only: {result['oracle_rule']})")
        lines.append(f"{'method':<9}|{'depth':>6} |{'CA':>7} |{'ASR':>7} |{'RA':>7} |{'DER':>7}")
        for r in result["rows"]:
            o = r["oracle"]
            if o.get("depth") is None:
                lines.append(f"{r['method']:<9}| " + ("prunes nothing" if r["candidates"] == 0 else
                                                       "no depth keeps CA within the tolerance"))
                continue
            lines.append(f"{r['method']:<9}|{o['depth']:6d} |{100 * o['ca']:7.2f} |{100 * o['asr']:7.2f} |"
                         f"{100 * o['ra']:7.2f} |{o['der']:7.4f}")
    own = [r for r in result["rows"] if "ca" in r.get("own_rule", {})]
    if own:
        lines.append("own rule (the method's published pruning rule on the same ranking; no purification)")
        lines.append(f"{'method':<9}|{'depth':>6} |{'CA':>7} |{'ASR':>7} |{'RA':>7} |{'DER':>7} | rule")
        for r in own:
            o = r["own_rule"]
            lines.append(f"{r['method']:<9}|{o['depth']:6d} |{100 * o['ca']:7.2f} |{100 * o['asr']:7.2f} |"
                         f"{100 * o['ra']:7.2f} |{o['der']:7.4f} | {o['rule']}")
    return "\n".join(lines)
