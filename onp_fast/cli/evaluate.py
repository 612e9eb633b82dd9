"""`onp-fast evaluate`: CA of a model on a data set's clean test split; ASR and RA with an attack spec."""
from __future__ import annotations

import json

import click

from ..errors import UserError
from .options import checkpoint_options, compute_options, load_model_and_data


@click.command("evaluate")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--dataset", required=True, help="Data set spec: digits, shapes, cifar10:PATH, ...")
@click.option("--attack-spec", "spec_path", type=click.Path(dir_okay=False), default=None,
              help="Attack spec JSON (MODEL.attack.json from `onp-fast attack`, or a bare attack spec).")
@click.option("--target", type=int, default=None, help="Target class (overrides the spec's).")
@checkpoint_options
@compute_options
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed for generated data sets.")
@click.option("--batch-size", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def command(model_path, dataset, spec_path, target, seed, batch_size, as_json, device, max_memory, **model_opts):
    """Evaluate MODEL on DATASET's test split (batches of at most --batch-size images, fewer where --max-memory
    cannot hold them; the numbers do not depend on it)."""
    from ..evaluate import evaluate, load_attack_spec
    from ..poison import check_target

    spec = load_attack_spec(spec_path) if spec_path else None
    loaded, splits, mean, std = load_model_and_data(model_path, dataset, seed=seed, device=device, **model_opts)
    attack = None
    if spec is not None:
        target = spec.target if target is None else target
        if target is None:
            raise UserError("the attack spec has no target class; pass --target")
        target = check_target(target, splits.num_classes)
        attack = spec.attack
    result = evaluate(loaded.model, splits.test_x, splits.test_y, mean, std, attack=attack, target=target,
                      batch_size=batch_size, max_memory=max_memory)
    result = {"model": str(model_path), "dataset": dataset, "preprocessing": {
                  "mean": list(mean), "std": list(std), "source": loaded.norm_source},
              **({"attack": attack.name, "target": target} if attack else {}), **result}
    if as_json:
        click.echo(json.dumps(result))
        return
    line = f"CA {100 * result['ca']:.2f}% ({result['n_test']} test images)"
    if attack is not None:
        line += (f"  ASR {100 * result['asr']:.2f}%  RA {100 * result['ra']:.2f}% "
                 f"({result['n_triggered']} triggered non-target images, {attack.name} -> class {target})")
    click.echo(line)
