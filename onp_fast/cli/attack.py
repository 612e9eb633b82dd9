"""`onp-fast attack`: train a backdoored model and write it with its attack spec."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ..attacks import parse_params
from .options import data_files


@click.command("attack")
@click.option("--dataset", "dataset", required=True, help="Data set spec: digits, shapes, cifar10:PATH, ...")
@click.option("--attack", "attack_name", required=True, help="Attack name: badnets, blended, sig, wanet.")
@click.option("--arch", required=True, help="Architecture, e.g. preactresnet18.")
@click.option("--width", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Channel width multiplier.")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--poison-rate", type=float, default=0.1, show_default=True, help="Fraction of the training set, (0, 1].")
@click.option("--target", type=int, default=0, show_default=True, help="Target class (all-to-one).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Peak learning rate (default: the training loop's).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Attack parameter, repeatable (e.g. --param alpha=0.1).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write (model.pt).")
@click.option("--force", is_flag=True, help="Replace the checkpoint and its attack spec if they exist.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def command(dataset, attack_name, arch, width, epochs, poison_rate, target, seed, batch_size, lr, params, out,
            force, threads, quiet):
    """Train ARCH on the poisoned DATASET; write the checkpoint and OUT's .attack.json beside it."""
    from .. import attacks, models
    from ..atomic import check_outputs, write_text
    from ..data import load_dataset
    from ..evaluate import SPEC_FORMAT, attack_spec_path, evaluate
    from ..io import save_model
    from ..poison import check_rate, check_target, train_backdoored
    from ..seed import seed_everything

    attacks.get(attack_name)  # unknown name: fail before loading anything
    rate = check_rate(poison_rate)
    out_path = Path(out)
    check_outputs({"--out": out_path, "attack spec": attack_spec_path(out_path)}, data_files(dataset), force)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    splits = load_dataset(dataset, seed=seed)
    target = check_target(target, splits.num_classes)
    c, h, w = splits.input_shape
    attack = attacks.build(attack_name, (c, h, w), seed=seed, **parse_params(params))
    seed_everything(seed)
    model = models.build(arch, num_classes=splits.num_classes, in_channels=c, width=width, input_size=h)
    start = time.perf_counter()
    poisoned = train_backdoored(model, attack, splits, epochs=epochs, rate=rate, target=target, seed=seed,
                                batch_size=batch_size, lr=lr, progress=not quiet)
    seconds = time.perf_counter() - start
    result = evaluate(model, splits.test_x, splits.test_y, splits.mean, splits.std, attack=attack, target=target)
    meta = {
        "format": SPEC_FORMAT,
        "attack": attack.spec(),
        "target": target,
        "poison_rate": rate,
        "seed": seed,
        "dataset": dataset,
        "split": {"name": splits.name, "train": "train", "test": "test", "n_train": int(splits.train_y.numel()),
                  "n_test": int(splits.test_y.numel()),
                  "poisoned": "per batch" if poisoned.transform is not None and poisoned.poisoned_index.numel() == 0
                  else int(poisoned.poisoned_index.numel())},
        "training": {"arch": model.onp_arch, "width": width, "epochs": epochs, "batch_size": batch_size,
                     "lr": lr, "seconds": round(seconds, 2)},
        "metrics": {k: result[k] for k in ("ca", "asr", "ra")},
    }
    save_model(model, out_path, mean=splits.mean, std=splits.std, attack=meta)
    spec_path = attack_spec_path(out_path)
    write_text(spec_path, json.dumps(meta, indent=2) + "\n")
    click.echo(f"{attack.name} on {dataset}: CA {100 * result['ca']:.2f}%  ASR {100 * result['asr']:.2f}%  "
               f"RA {100 * result['ra']:.2f}%  ({seconds:.1f}s training)")
    click.echo(f"wrote {out_path} and {spec_path}")
