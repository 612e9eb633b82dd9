"""What repair costs a model with no backdoor: ONP with the default settings on clean models (the proxies may
flag a class that is only naturally easy to reach), test CA before and after.

    python experiments/clean_cost.py --models digits/clean/s0,fashion-mnist/clean/w0.25/n10000/e15 --threads 1
"""
from __future__ import annotations

import argparse
import sys
import time

from bench_args import add_run_options, apply_run_options
from detect_table import parse_model
from quality import backdoored

from onp_fast.data import defense_subset, load_dataset, normalize
from onp_fast.evaluate import evaluate
from onp_fast.repair import repair


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, help="comma-separated DATASET/clean[/sSEED][/wWIDTH][/nTRAIN]")
    ap.add_argument("--arch", default="preactresnet18")
    ap.add_argument("--defense-size", type=int, default=500)
    add_run_options(ap)
    args = ap.parse_args(argv)
    apply_run_options(args)
    for text in args.models.split(","):
        m = parse_model(text)
        splits = load_dataset(m["dataset"], seed=0)
        model, _ = backdoored(m["dataset"], splits, m["attack"], args.arch, m["width"], m["epochs"], m["seed"],
                              train_subset=m["train_subset"])
        x, y = defense_subset(splits, args.defense_size, seed=0)
        t = time.perf_counter()
        res = repair(model, normalize(x, splits.mean, splits.std), y, splits.num_classes, progress=False)
        before = evaluate(model, splits.test_x, splits.test_y, splits.mean, splits.std)["ca"]
        after = evaluate(res.model, splits.test_x, splits.test_y, splits.mean, splits.std)["ca"]
        p = res.report["trigger_proxy"]
        print(f"{text:<40} CA {100 * before:6.2f} -> {100 * after:6.2f}  pruned {int(res.prune.sum())}  suspect "
              f"{p['family']}/{p['target']} index {p['anomaly_index']:.2f} flagged {p['flagged']}  purify kept "
              f"{res.report['purify']['kept']}  ({time.perf_counter() - t:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
