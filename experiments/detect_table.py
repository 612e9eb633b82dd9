"""Trigger-proxy detection: per model, each proxy family's most anomalous class and its anomaly index, the
suspect (what `prepare` flags when its index reaches the threshold) and the true target. On clean models every
flag is a false positive: the table gives the false-positive rate of the default threshold.

    python experiments/detect_table.py --models digits/clean/s0,digits/clean/s1,digits/badnets \\
        --param sig.train_delta=0.0980 --param sig.delta=0.4706 --threads 2

A model is DATASET/ATTACK[/sSEED][/wWIDTH][/nTRAIN][/eEPOCHS] (ATTACK "clean": no poisoning), trained once into
experiments/quality.py's cache. The proxies are synthesised exactly as `prepare` does (same split of the same
500 defense images, same seed).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from bench_args import add_run_options, apply_run_options
from quality import backdoored

from onp_fast.data import defense_subset, load_dataset, normalize, stratified_split
from onp_fast.prepare import RepairConfig, synthesize_proxies
from onp_fast.prepare.trigger import DEFAULT_FAMILIES


def parse_model(text: str) -> dict:
    dataset, attack, *rest = text.split("/")
    m = {"dataset": dataset, "attack": attack, "seed": 0, "width": 0.5, "train_subset": 0, "epochs": 30}
    keys = {"s": ("seed", int), "w": ("width", float), "n": ("train_subset", int), "e": ("epochs", int)}
    for part in rest:
        key, kind = keys[part[0]]
        m[key] = kind(part[1:])
    return m


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, help="comma-separated DATASET/ATTACK[/sSEED][/wWIDTH][/nTRAIN][/eEPOCHS]")
    ap.add_argument("--arch", default="preactresnet18")
    ap.add_argument("--defense-size", type=int, default=500)
    ap.add_argument("--trigger-families", default=",".join(DEFAULT_FAMILIES),
                    help="proxy families (onp_fast.prepare.trigger.FAMILIES), comma-separated")
    ap.add_argument("--json", default=None)
    add_run_options(ap)
    args = ap.parse_args(argv)
    params = apply_run_options(args)
    cfg = RepairConfig(trigger_families=args.trigger_families).check()
    rows = []
    for text in args.models.split(","):
        m = parse_model(text)
        splits = load_dataset(m["dataset"], seed=0)
        model, _ = backdoored(m["dataset"], splits, m["attack"], args.arch, m["width"], m["epochs"], m["seed"],
                              params.get(m["attack"]), train_subset=m["train_subset"])
        x, y = defense_subset(splits, args.defense_size, seed=cfg.seed)
        xn = normalize(x, splits.mean, splits.std)
        i_opt, _ = stratified_split(y, cfg.val_fraction, cfg.seed)
        t = time.perf_counter()
        ps = synthesize_proxies(model, xn[i_opt], y[i_opt], splits.num_classes, seed=cfg.seed,
                                families=cfg.trigger_families)
        seconds = time.perf_counter() - t
        fam = {f: {"class": int(ps.z_scores(f).argmax()), "anomaly": float(ps.z_scores(f).max()),
                   "z_target0": float(ps.z_scores(f)[0]), "norms": ps.norms[f].tolist()} for f in ps.patterns}
        s = ps.suspect()
        row = {"model": text, "families": fam, "suspect": {"family": s.family, "class": s.target,
                                                           "anomaly": s.anomaly_index},
               "flagged": s.anomaly_index >= cfg.anomaly_threshold, "true_target": None if m["attack"] == "clean"
               else 0, "seconds": seconds}
        rows.append(row)
        print(f"{text:<34} " + "  ".join(f"{f}: class {v['class']} z {v['anomaly']:5.2f} (class 0: "
                                         f"{v['z_target0']:5.2f})" for f, v in fam.items())
              + f"  -> {'FLAGGED' if row['flagged'] else 'not flagged'} {s.family}/{s.target} ({seconds:.0f}s)",
              flush=True)
    clean = [r for r in rows if r["true_target"] is None]
    bad = [r for r in rows if r["true_target"] is not None]
    print(f"clean models flagged: {sum(r['flagged'] for r in clean)} of {len(clean)}; backdoored flagged on the "
          f"true target: {sum(r['flagged'] and r['suspect']['class'] == 0 for r in bad)} of {len(bad)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
