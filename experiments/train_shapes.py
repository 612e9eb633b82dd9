"""Clean training on the procedural `shapes` data set: accuracy and wall time.

    .venv/bin/python experiments/train_shapes.py [--arch preactresnet18] [--width 0.25] [--epochs 3]
        [--data shapes] [--threads 1] [--out result.json]

Acceptance figure (issue 3): preactresnet18 at width 0.25 reaches >= 90% test accuracy.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from onp_fast import data, models, train
from onp_fast.seed import seed_everything


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="preactresnet18")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--data", default="shapes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    d = data.load_dataset(args.data, seed=args.seed)
    t_data = time.perf_counter() - t0
    c, h, _ = d.input_shape
    seed_everything(args.seed)
    model = models.build(args.arch, num_classes=d.num_classes, in_channels=c, width=args.width, input_size=h)
    t1 = time.perf_counter()
    train.train_classifier(model, d.train_x, d.train_y, epochs=args.epochs, mean=d.mean, std=d.std,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed, desc=args.arch)
    t_train = time.perf_counter() - t1
    acc = train.accuracy(model, d.test_x, d.test_y, d.mean, d.std)
    result = dict(arch=args.arch, width=args.width, data=d.name, train_images=int(d.train_x.shape[0]),
                  test_images=int(d.test_x.shape[0]), epochs=args.epochs, threads=torch.get_num_threads(),
                  data_seconds=round(t_data, 2), train_seconds=round(t_train, 1), test_accuracy=round(acc, 4))
    print(json.dumps(result))
    if args.out:
        from onp_fast.atomic import write_text

        write_text(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
