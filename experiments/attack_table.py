"""The attack acceptance table: a clean model and one backdoored model per attack, same architecture and seed.

    .venv/bin/python experiments/attack_table.py [--dataset digits] [--arch preactresnet18] [--width 0.5]
        [--epochs 20] [--attacks badnets,blended,sig,wanet] [--json out.json]

Prints attack, CA, ASR, RA, training seconds, and whether each attack meets the bar: ASR >= 95%, CA within
2 points of the clean model, training under 300 s (wall, or CPU seconds when other jobs share the CPU:
with --threads 1 one training uses one core, so its CPU seconds are its wall time on an idle core). Nothing is cached: every model is trained here.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from bench_args import add_run_options, apply_run_options

from onp_fast import attacks, models
from onp_fast.atomic import write_text
from onp_fast.data import load_dataset
from onp_fast.evaluate import evaluate
from onp_fast.poison import train_backdoored
from onp_fast.seed import seed_everything
from onp_fast.train import train_classifier

ASR_BAR, CA_DROP_BAR, SECONDS_BAR = 0.95, 0.02, 300.0


def _model(args, splits):
    seed_everything(args.seed)
    c, h, _ = splits.input_shape
    return models.build(args.arch, num_classes=splits.num_classes, in_channels=c, width=args.width, input_size=h)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--arch", default="preactresnet18")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attacks", default="badnets,blended,sig,wanet")
    ap.add_argument("--json", default=None, help="also write the rows here")
    add_run_options(ap)
    args = ap.parse_args(argv)
    params = apply_run_options(args)
    splits = load_dataset(args.dataset, seed=args.seed)
    rows = []

    model = _model(args, splits)
    t0, c0 = time.perf_counter(), time.process_time()
    train_classifier(model, splits.train_x, splits.train_y, epochs=args.epochs, mean=splits.mean, std=splits.std,
                     seed=args.seed, desc="clean")
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    clean = evaluate(model, splits.test_x, splits.test_y, splits.mean, splits.std)
    rows.append({"attack": "clean", "ca": clean["ca"], "asr": None, "ra": None, "seconds": seconds, "cpu_seconds": cpu})
    print(f"clean: CA {100 * clean['ca']:.2f}%  {seconds:.1f}s ({cpu:.1f} CPU s)", flush=True)

    for name in args.attacks.split(","):
        attack = attacks.build(name, splits.input_shape, seed=args.seed, **params.get(name, {}))
        model = _model(args, splits)
        t0, c0 = time.perf_counter(), time.process_time()
        train_backdoored(model, attack, splits, epochs=args.epochs, seed=args.seed)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        r = evaluate(model, splits.test_x, splits.test_y, splits.mean, splits.std, attack=attack, target=0)
        ok = r["asr"] >= ASR_BAR and clean["ca"] - r["ca"] <= CA_DROP_BAR and min(seconds, cpu) < SECONDS_BAR
        rows.append({"attack": name, "params": attack.params(), "ca": r["ca"], "asr": r["asr"], "ra": r["ra"], "seconds": seconds, "cpu_seconds": cpu,
                     "ok": ok})
        print(f"{name}: CA {100 * r['ca']:.2f}%  ASR {100 * r['asr']:.2f}%  RA {100 * r['ra']:.2f}%  "
              f"{seconds:.1f}s ({cpu:.1f} CPU s)  {'ok' if ok else 'MISSED'}", flush=True)

    print(f"\n{args.dataset}, {args.arch} width {args.width}, {args.epochs} epochs, seed {args.seed}, "
          f"torch threads {torch.get_num_threads()}")
    print("| attack | CA % | ASR % | RA % | seconds | CPU seconds | bar |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
        bar = "-" if "ok" not in row else ("ok" if row["ok"] else "MISSED")
        print(f"| {row['attack']} | {pct(row['ca'])} | {pct(row['asr'])} | {pct(row['ra'])} | "
              f"{row['seconds']:.1f} | {row['cpu_seconds']:.1f} | {bar} |")
    if args.json:
        write_text(args.json, json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    return 0 if all(row.get("ok", True) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
