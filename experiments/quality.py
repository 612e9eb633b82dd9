"""Quality benchmark: repair backdoored models and report CA / ASR / RA / DER / time per attack, the ASR/CA
frontier of ONP's ranking beside an RNP-style ranking, the re-activation check, and the reward ablation.

    python experiments/quality.py --dataset digits --attacks badnets,blended,wanet,sig
    python experiments/quality.py --dataset shapes --width 0.5 --attacks badnets,blended
    python experiments/quality.py --ablation          # each reward term switched off in turn

Backdoored models are trained once and cached in .onp_cache/quality/. Test-set numbers are measured here for
reporting only; repair never sees them (its depth comes from the held-out defense images).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from bench_args import add_model_options, add_run_options, apply_run_options

from onp_fast import attacks, models
from onp_fast.data import defense_subset, load_dataset, normalize, stratified_indices
from onp_fast.defenses import ONPConfig, rnp_scores
from onp_fast.evaluate import evaluate
from onp_fast.metrics import defense_effectiveness_rating
from onp_fast.poison import train_backdoored
from onp_fast.prepare import finetune_pruned, prepare, unlearn
from onp_fast.repair import RepairConfig, RewardWeights, repair, run
from onp_fast.seed import seed_everything
from onp_fast.train import train_classifier

CACHE = Path(__file__).resolve().parent.parent / ".onp_cache" / "quality"


def backdoored(dataset, splits, attack_name, arch, width, epochs, seed, params=None, train_subset=0):
    """The cached model trained on `dataset` with `attack_name` (10% poisoned, target 0), or without poisoning when
    attack_name is "clean" (attack None). train_subset > 0: trained on that many training images (a seeded
    stratified subset; defense images may still come from the whole training split). -> (model, attack)."""
    clean = attack_name == "clean"
    attack = None if clean else attacks.build(attack_name, tuple(splits.train_x.shape[1:]), seed=seed,
                                              **(params or {}))
    c, h = splits.train_x.shape[1], splits.train_x.shape[2]
    seed_everything(seed)
    model = models.build(arch, num_classes=splits.num_classes, in_channels=c, width=width, input_size=h)
    tag = "".join(f"-{k}{v:.4g}" for k, v in sorted((params or {}).items()))
    sub = f"-n{train_subset}r{DEFENSE_RESERVE}" if train_subset else ""  # r: defense images held out
    path = CACHE / f"{dataset.replace(':', '_')}{sub}-{attack_name}{tag}-{arch}-w{width}-e{epochs}-s{seed}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        t = time.perf_counter()
        part = splits
        if train_subset:
            idx = training_subset(splits.train_y, train_subset, seed)
            part = dataclasses.replace(splits, train_x=splits.train_x[idx], train_y=splits.train_y[idx])
        if clean:
            train_classifier(model, part.train_x, part.train_y, epochs=epochs, mean=part.mean, std=part.std,
                             seed=seed, progress=False)
        else:
            train_backdoored(model, attack, part, epochs=epochs, seed=seed, progress=False)
        print(f"  trained {attack_name} in {time.perf_counter() - t:.0f}s", flush=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval(), attack


DEFENSE_RESERVE = 2000  # training images never used to train a subset model: defense sets are drawn from them


def training_subset(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n stratified training indices outside the first DEFENSE_RESERVE of `defense_subset`'s seeded order, so the
    defense images of any size up to the reserve (same seed) are never training images of the model."""
    reserve = stratified_indices(y, min(DEFENSE_RESERVE, len(y) - n), seed)
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[reserve] = False
    rest = torch.nonzero(rest).flatten()
    return rest[stratified_indices(y[rest], n, seed)]


def ev(model, splits, attack, target=0):
    return evaluate(model, splits.test_x, splits.test_y, splits.mean, splits.std, attack=attack, target=target)


def prune_eval(model, groups, prune, splits, attack):
    return ev(groups.pruned_copy(model, prune), splits, attack)


def ablation_weights(default: RewardWeights) -> list[tuple[str, RewardWeights]]:
    """The reward ablation: each term of the default reward switched off, and each term the default leaves off
    switched on (weight 1), so both the kept and the dropped terms are justified by a measurement."""
    out = []
    for term, value in default.to_dict().items():
        label = f"without {term}" if value else f"with {term}=1"
        out.append((label, RewardWeights(**{**default.to_dict(), term: 0.0 if value else 1.0})))
    return out


def ablation(model, xn, y, splits, attack, before, cfg, onp: ONPConfig) -> dict:
    """Each `ablation_weights` setting on one shared preparation (split, groups, unlearned model, trigger proxy,
    perturbations: computed once with every term on), then ONP's policy and the depth rule with that reward.
    A term switched off also drops what only it feeds (no proxy for the features without CA_T)."""
    all_on = copy.deepcopy(cfg)
    all_on.weights = RewardWeights(**{k: (v or 1.0) for k, v in cfg.weights.to_dict().items()})
    t = time.perf_counter()
    ctx = prepare(model, xn, y, splits.num_classes, all_on, progress=False)
    print(f"  ablation: shared preparation {time.perf_counter() - t:.0f}s", flush=True)
    out = {}
    for label, w in [("default", cfg.weights)] + ablation_weights(cfg.weights):
        c2 = copy.deepcopy(cfg)
        c2.weights = w
        ctx2 = dataclasses.replace(ctx, cfg=c2, times={}, trigger=ctx.trigger if w.ca_t else None,
                                   perturbations=ctx.perturbations if w.ca_p else None)
        t2 = time.perf_counter()
        r2 = run(ctx2, "onp", onp)
        a2 = ev(r2.model, splits, attack)
        out[label] = {"ca": a2["ca"], "asr": a2["asr"], "ra": a2["ra"], "pruned": int(r2.prune.sum()),
                      "seconds": time.perf_counter() - t2,
                      "der": defense_effectiveness_rating(before["asr"], a2["asr"], before["ca"], a2["ca"])}
        print(f"  {label:<16}: CA {a2['ca']:.4f} ASR {a2['asr']:.4f} RA {a2['ra']:.4f} pruned "
              f"{int(r2.prune.sum())} ({out[label]['seconds']:.0f}s)", flush=True)
    return out


def frontier(model, groups, order, splits, attack, depths):
    rows = []
    for d in depths:
        prune = torch.zeros(groups.num_groups, dtype=torch.bool)
        prune[order[:d]] = True
        r = prune_eval(model, groups, prune, splits, attack)
        rows.append((d, r["ca"], r["asr"]))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(ap)
    ap.add_argument("--defense-size", type=int, default=500)
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ablation", action="store_true", help="also repair with each reward term off")
    ap.add_argument("--ablation-only", action="store_true", help="only the ablation (no repair table, frontier or "
                    "re-activation)")
    ap.add_argument("--no-frontier", action="store_true")
    ap.add_argument("--no-reactivation", action="store_true")
    ap.add_argument("--json", default=None)
    add_run_options(ap)
    args = ap.parse_args(argv)
    params = apply_run_options(args)
    splits = load_dataset(args.dataset, seed=args.seed)
    results = []
    for name in args.attacks.split(","):
        print(f"== {name}", flush=True)
        model, attack = backdoored(args.dataset, splits, name, args.arch, args.width, args.epochs, args.seed,
                                   params.get(name))
        before = ev(model, splits, attack)
        x, y = defense_subset(splits, args.defense_size, seed=args.seed)
        xn = normalize(x, splits.mean, splits.std)
        cfg = RepairConfig(seed=args.seed)
        onp = ONPConfig(**({"iterations": args.iterations} if args.iterations else {}))
        if args.ablation_only:
            results.append({"attack": name, "before": before, "ablation": ablation(model, xn, y, splits, attack,
                                                                                   before, cfg, onp)})
            continue
        t = time.perf_counter()
        res = repair(model, xn, y, splits.num_classes, "onp", cfg, onp, progress=False)
        secs = time.perf_counter() - t
        after = ev(res.model, splits, attack)
        row = {"attack": name, "before": before, "after": after, "seconds": secs,
               "pruned": int(res.prune.sum()), "groups": res.groups.num_groups,
               "der": defense_effectiveness_rating(before["asr"], after["asr"], before["ca"], after["ca"]),
               "ca_val": [res.report["ca_val_before"], res.report["ca_val_after"]], "times": res.report["times_s"],
               "stopping_rule": res.report["stopping_rule"], "trigger_proxy": res.report["trigger_proxy"]}
        print(f"  before CA {before['ca']:.4f} ASR {before['asr']:.4f} | after CA {after['ca']:.4f} "
              f"ASR {after['asr']:.4f} RA {after['ra']:.4f} DER {row['der']:.4f} | pruned {row['pruned']}"
              f"/{row['groups']} in {secs:.0f}s {res.report['times_s']}\n  trigger proxy {res.report['trigger_proxy']}",
              flush=True)
        if not args.no_reactivation:
            ft = finetune_pruned(copy.deepcopy(res.model), res.groups, res.prune, xn, y, epochs=10, seed=args.seed)
            row["reactivation"] = ev(ft, splits, attack)
            print(f"  re-activation (10 clean epochs, pruned held at 0): CA {row['reactivation']['ca']:.4f} "
                  f"ASR {row['reactivation']['asr']:.4f}", flush=True)
        if not args.no_frontier:
            groups = res.groups
            onp_order = torch.argsort(res.scores, descending=True, stable=True)
            u, _ = unlearn(model, xn, y, seed=args.seed)
            rnp_order = torch.argsort(rnp_scores(u, groups, xn, y, seed=args.seed), descending=True, stable=True)
            depths = [0, 2, 5, 10, 15, 20, 30, 40, 60, 80, 100, 130, 160, 200]
            fo = frontier(model, groups, onp_order, splits, attack, depths)
            fr = frontier(model, groups, rnp_order, splits, attack, depths)
            row["frontier"] = {"depths": depths, "onp": fo, "rnp": fr}
            print("  depth | ONP CA  ASR    | RNP CA  ASR   (test set, diagnostic only)")
            for (d, ca1, a1), (_, ca2, a2) in zip(fo, fr):
                print(f"  {d:5d} | {ca1:.4f} {a1:.4f} | {ca2:.4f} {a2:.4f}")
        if args.ablation:
            row["ablation"] = ablation(model, xn, y, splits, attack, before, cfg, onp)
        results.append(row)
    print("\nattack    | CA before | ASR before | CA after | ASR after | RA after | DER    | seconds | re-act ASR")
    for r in results:
        if "after" not in r:
            continue
        re = r.get("reactivation", {}).get("asr", float("nan"))
        print(f"{r['attack']:<9} | {100 * r['before']['ca']:9.2f} | {100 * r['before']['asr']:10.2f} | "
              f"{100 * r['after']['ca']:8.2f} | {100 * r['after']['asr']:9.2f} | {100 * r['after']['ra']:8.2f} | "
              f"{r['der']:.4f} | {r['seconds']:7.1f} | {100 * re:.2f}")
    if any("ablation" in r for r in results):
        print("\nreward ablation (one shared preparation per attack)")
        print("attack    | reward           | CA after | ASR after | RA after | DER    | pruned")
        for r in results:
            for label, a in r.get("ablation", {}).items():
                print(f"{r['attack']:<9} | {label:<16} | {100 * a['ca']:8.2f} | {100 * a['asr']:9.2f} | "
                      f"{100 * a['ra']:8.2f} | {a['der']:.4f} | {a['pruned']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
