"""The ASR a model that never saw a trigger scores: a clean model trained with the benchmark's recipe (the
backdoored models' architecture, width, epochs, training subset and seed; experiments/quality.py's cache),
evaluated with each attack's trigger and target. ASR counts every non-target test image the triggered input sends
to the target, natural confusions included, so this is the floor a repaired model is measured against. Also
printed: the share of each source class sent to the target, and of the clean images. --retune: also the clean
model's ASR after the retuning attack (onp_fast.compare.retune on the defense set compare draws), the floor of the
retune column: what five poisoned images teach a model that never had the backdoor.

    python experiments/asr_floor.py --dataset fashion-mnist --width 0.25 --epochs 15 --train-subset 10000 --retune
"""
from __future__ import annotations

import argparse
import json

from bench_args import add_model_options, add_run_options, apply_run_options
from quality import backdoored, ev

from onp_fast import attacks
from onp_fast.atomic import write_text
from onp_fast.compare import retune
from onp_fast.data import defense_subset, load_dataset, normalize
from onp_fast.evaluate import predict_classes
from onp_fast.groups import find_groups


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(ap)
    ap.add_argument("--train-subset", type=int, default=0, help="the clean model trained on this many images")
    ap.add_argument("--seed", type=int, default=0, help="the attacks' and the defense set's seed")
    ap.add_argument("--model-seed", type=int, default=None,
                    help="the clean model's training seed (default: --seed); another seed, another clean model")
    ap.add_argument("--target", type=int, default=0)
    ap.add_argument("--retune", action="store_true", help="also the retuning attack's ASR on the clean model")
    ap.add_argument("--defense-size", type=int, default=500, help="defense images of the retuning attack")
    ap.add_argument("--json", default=None)
    add_run_options(ap)
    args = ap.parse_args(argv)
    params = apply_run_options(args)
    splits = load_dataset(args.dataset, seed=args.seed)
    model, _ = backdoored(args.dataset, splits, "clean", args.arch, args.width, args.epochs,
                          args.seed if args.model_seed is None else args.model_seed, train_subset=args.train_subset)
    other = splits.test_y != args.target
    src = splits.test_y[other]
    clean_pred = predict_classes(model, splits.test_x[other], splits.mean, splits.std)
    out = {"clean": {**ev(model, splits, None),
                     "to_target": float((clean_pred == args.target).float().mean())}}
    print(f"clean model: CA {100 * out['clean']['ca']:.2f}, clean non-target images sent to {args.target}: "
          f"{100 * out['clean']['to_target']:.2f}%")
    classes = [c for c in range(splits.num_classes) if c != args.target]
    if args.retune:  # the defense set compare draws, and the model's groups, for every attack
        x, y = defense_subset(splits, args.defense_size, seed=args.seed)
        xn, groups = normalize(x, splits.mean, splits.std), find_groups(model, tuple(x.shape[1:]))
    for name in args.attacks.split(","):
        attack = attacks.build(name, tuple(splits.train_x.shape[1:]), seed=args.seed, **(params.get(name) or {}))
        r = ev(model, splits, attack, target=args.target)
        pred = predict_classes(model, attack.apply(splits.test_x[other]), splits.mean, splits.std)
        r["per_source"] = {c: float((pred[src == c] == args.target).float().mean()) for c in classes}
        if args.retune:
            tuned = retune(model, groups, xn, y, splits.mean, splits.std, attack, args.target, seed=args.seed)
            r["retune_asr"] = ev(tuned, splits, attack, target=args.target)["asr"]
        out[name] = r
        print(f"{name:<8} ASR {100 * r['asr']:6.2f}  RA {100 * r['ra']:6.2f}"
              + (f"  retune ASR {100 * r['retune_asr']:6.2f}" if args.retune else "")
              + "  sent to the target per source class: "
              + " ".join(f"{c}:{100 * v:.1f}" for c, v in r["per_source"].items()), flush=True)
    if args.json:
        write_text(args.json, json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
