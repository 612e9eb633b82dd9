"""Purification ablation: pruning only / purification only / both, per purification mode, on cached backdoored
models: CA, ASR, clean re-activation ASR and the retuning attack's ASR (test set, for reporting only; repair
never sees it).

    python experiments/purify_table.py --dataset digits --attacks badnets,blended,wanet,sig \
        --param sig.train_delta=0.0980 --param sig.delta=0.4706 --threads 2
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
from quality import backdoored, ev

from onp_fast.compare import retune
from onp_fast.data import defense_subset, load_dataset, normalize
from onp_fast.prepare import RepairConfig, finetune_pruned, prepare
from onp_fast.prepare.trigger import DEFAULT_FAMILIES, DEFAULT_PURIFY_FAMILIES
from onp_fast.repair import run
from onp_fast.repair.purify import purify

MODES = ("sam", "proxy", "sam+proxy")


def measure(model, groups, prune, splits, attack, xn, y, seed) -> dict:
    """CA / ASR of `model`, after 10 clean epochs with pruned groups held at zero, and after the retuning attack."""
    r = ev(model, splits, attack)
    re = ev(finetune_pruned(copy.deepcopy(model), groups, prune, xn, y, epochs=10, seed=seed), splits, attack)
    rt = ev(retune(model, groups, xn, y, splits.mean, splits.std, attack, 0, seed=seed), splits, attack)
    return {"ca": r["ca"], "asr": r["asr"], "re_asr": re["asr"], "re_ca": re["ca"], "retune_asr": rt["asr"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(ap)
    ap.add_argument("--defense-size", type=int, default=500)
    ap.add_argument("--purify-epochs", type=int, default=10)
    ap.add_argument("--modes", default=",".join(MODES), help="purification modes to measure")
    ap.add_argument("--no-only", action="store_true", help="skip the purification-only rows (no pruning)")
    ap.add_argument("--paths", default="0",
                    help="path-aware steps to measure (RepairConfig.purify_path), comma-separated; 0: off")
    ap.add_argument("--train-subset", type=int, default=0, help="backdoored model trained on this many images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repair-seed", type=int, default=None,
                    help="RepairConfig.seed alone (default: --seed): the same model, defense images and attacks, "
                         "another draw of the repair's own randomness (its split, proxies, policy, purification)")
    ap.add_argument("--trigger-families", default=",".join(DEFAULT_FAMILIES),
                    help="proxy families (onp_fast.prepare.trigger.FAMILIES), comma-separated")
    ap.add_argument("--purify-families", default=",".join(DEFAULT_PURIFY_FAMILIES),
                    help="more proxy families, for purification only (RepairConfig.purify_families; '' for none)")
    ap.add_argument("--json", default=None)
    add_run_options(ap)
    args = ap.parse_args(argv)
    params = apply_run_options(args)
    splits = load_dataset(args.dataset, seed=args.seed)
    out = []
    for name in args.attacks.split(","):
        model, attack = backdoored(args.dataset, splits, name, args.arch, args.width, args.epochs, args.seed,
                                   params.get(name), train_subset=args.train_subset)
        x, y = defense_subset(splits, args.defense_size, seed=args.seed)
        xn = normalize(x, splits.mean, splits.std)
        before = ev(model, splits, attack)
        t = time.perf_counter()
        cfg = RepairConfig(seed=args.seed if args.repair_seed is None else args.repair_seed,
                           trigger_families=args.trigger_families,
                           purify_families=args.purify_families).check()
        ctx = prepare(model, xn, y, splits.num_classes, cfg, progress=False)
        res = run(ctx, "onp", purify="none")
        rows = {"pruning only": measure(res.model, res.groups, res.prune, splits, attack, xn, y, args.seed)}
        print(f"== {name}: before CA {before['ca']:.4f} ASR {before['asr']:.4f}; pruned {int(res.prune.sum())} "
              f"({time.perf_counter() - t:.0f}s); proxy {res.report['trigger_proxy']}", flush=True)
        none = torch.zeros_like(res.prune)
        ca_val = res.report["ca_val_before"]
        for mode, path in [(m, float(a)) for m in args.modes.split(",") for a in args.paths.split(",")]:
            c = dataclasses.replace(ctx, cfg=dataclasses.replace(ctx.cfg, purify=mode, purify_path=path,
                                                                 purify_epochs=args.purify_epochs))
            tag = f"{mode}, path {path:g}" if path else mode
            variants = [(f"prune + {tag}", res.model, res.prune)]
            if not args.no_only:
                variants.append((f"{tag} only", ctx.model, none))
            for label, start, prune in variants:
                m = copy.deepcopy(start)
                t = time.perf_counter()
                part = purify(c, m, prune, ca_val, mode)
                rows[label] = {**measure(m, res.groups, prune, splits, attack, xn, y, args.seed),
                               "kept": part["kept"], "kept_epochs": part["kept_epochs"],
                               "ca_val_per_epoch": part["ca_val_per_epoch"],
                               "proxy_images": part["proxy_images_per_epoch"],
                               "seconds": time.perf_counter() - t}
        for label, r in rows.items():
            print(f"  {label:<28} CA {100 * r['ca']:6.2f} ASR {100 * r['asr']:6.2f} | re-act ASR "
                  f"{100 * r['re_asr']:6.2f} (CA {100 * r['re_ca']:6.2f}) | retune ASR {100 * r['retune_asr']:6.2f}"
                  + ("" if r.get("kept", True) else "  (undone by the held-out guard)")
                  + (f" | epochs kept {r['kept_epochs']}" if "kept_epochs" in r else ""), flush=True)
        out.append({"attack": name, "before": before, "pruned": int(res.prune.sum()), "rows": rows})
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
