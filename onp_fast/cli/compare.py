"""`onp-fast compare`: ONP and the baseline defenses (FP, ANP, RNP, CLP) on one model, the same defense data and
seed; one table of CA, ASR, RA, DER, seconds and re-activation ASR, and an "oracle" table apart."""
from __future__ import annotations

import click

from ..errors import UserError
from .options import (accuracy_check_option, check_defense_accuracy, checkpoint_options, compute_options,
                      data_files, defense_images, load_model_and_data)


def parse_methods(text: str) -> list[str]:
    """"onp,onp/none,fp" -> ["onp", "onp/none", "fp"] (lower-cased, duplicates dropped); UserError for an empty
    list or an unknown method or purification (onp_fast.compare.method_spec)."""
    from ..compare import method_spec
    from ..defenses import METHODS

    names = []
    for part in text.split(","):
        if not part.strip():
            continue
        name, mode = method_spec(part)
        name = name if mode is None else f"{name}/{mode}"
        if name not in names:
            names.append(name)
    if not names:
        raise UserError(f"--methods is empty: use one or more of {', '.join(METHODS)}")
    return names


@click.command("compare")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--dataset", required=True, help="Data set spec: defense images from its train split, metrics on test.")
@click.option("--attack-spec", "spec_path", required=True, type=click.Path(dir_okay=False),
              help="Attack spec JSON (MODEL.attack.json from `onp-fast attack`), for ASR / RA only.")
@click.option("--methods", default="onp,onp/none,fp,anp,rnp,clp,ftsam", show_default=True,
              help="Comma-separated defenses; METHOD/PURIFY runs a method with that purification (onp/none: ONP "
                   "pruning only, its ranking shared with the onp row).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the results as JSON.")
@click.option("--defense-size", type=click.IntRange(min=1), default=None,
              help="Clean images the defenses share [default: every one available, up to 500].")
@click.option("--target", type=int, default=None, help="Target class (overrides the spec's).")
@click.option("--reactivation-epochs", type=click.IntRange(min=0), default=10, show_default=True,
              help="Clean fine-tuning epochs (pruned channels held at zero) for the re-activation ASR; 0: skip.")
@click.option("--retune-epochs", type=click.IntRange(min=0), default=5, show_default=True,
              help="Retuning attack (Min et al.): all weights tuned on the defense images + 5 poisoned; 0: skip.")
@click.option("--oracle/--no-oracle", "oracle_table", default=True, show_default=True,
              help="Also scan each method's ranking on the test set for the oracle table (one evaluation per depth "
                   "the held-out rule scanned: most of compare's time on a large test set).")
@click.option("--param", "params", multiple=True, metavar="METHOD.FIELD=VALUE",
              help="Hyper-parameter override, repeatable: e.g. anp.iterations=500, clp.u=2.5, onp.iterations=30, "
                   "repair.tolerance=0.05 (shared).")
@click.option("--reward-backend", type=click.Choice(["engine", "hooks"]), default=None,
              help="How masks are scored: the batched reward engine (default) or one hooked forward per mask (the "
                   "reference); the same as --param repair.reward_backend=...")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace the --json file if it exists.")
@checkpoint_options
@compute_options
@accuracy_check_option
@click.option("--quiet", is_flag=True, help="Print the table only.")
def command(model_path, dataset, spec_path, methods, json_path, defense_size, target, reactivation_epochs,
            retune_epochs, oracle_table, params, reward_backend, seed, force, skip_accuracy_check, quiet, device,
            max_memory, **model_opts):
    """Compare defenses on MODEL: each method's depth is chosen on held-out defense images (no test data)."""
    from ..atomic import check_outputs
    from ..compare import compare, format_table
    from ..data import normalize
    from ..defenses import apply_params, get as get_defense
    from ..evaluate import load_attack_spec
    from ..poison import check_target
    from ..repair import RepairConfig
    from ..repair.output import write_json

    names = parse_methods(methods)
    base = RepairConfig(seed=seed, device=device, max_memory=max_memory)
    if reward_backend is not None:
        base.reward_backend = reward_backend
    bases = [n.partition("/")[0] for n in names]
    cfg, configs = apply_params(params, bases, base)
    cfg.check()  # --param repair.device=... / repair.max_memory=... too: before anything is read
    for name in bases:  # a method's mode outside its choices (--param rnp.stop_check=...): before anything is read
        get_defense(name, configs.get(name))
    check_outputs({"--json": json_path}, {"model": model_path, "attack spec": spec_path, **data_files(dataset)},
                  force)
    spec = load_attack_spec(spec_path)
    loaded, splits, mean, std = load_model_and_data(model_path, dataset, seed=seed, device=cfg.device, **model_opts)
    target = spec.target if target is None else target
    if target is None:
        raise UserError("the attack spec has no target class; pass --target")
    target = check_target(target, splits.num_classes)
    if tuple(spec.attack.image_shape) != tuple(splits.input_shape):
        raise UserError(f"the attack spec is for images {list(spec.attack.image_shape)}, "
                        f"{dataset} has {list(splits.input_shape)}")
    x, y = defense_images(splits, defense_size, seed)  # train split only
    cfg = cfg.for_defense_set(y, splits.num_classes)
    check_defense_accuracy(loaded, splits, x, y, skip=skip_accuracy_check, max_memory=cfg.max_memory,
                           echo=None if quiet else lambda s: click.echo(s, err=True))
    result = compare(loaded.model, normalize(x, mean, std), y, splits.num_classes, test_x=splits.test_x,
                     test_y=splits.test_y, mean=mean, std=std, attack=spec.attack, target=target, methods=names,
                     cfg=cfg, configs=configs, reactivation_epochs=reactivation_epochs,
                     retune_epochs=retune_epochs, oracle_table=oracle_table, progress=False,
                     log=None if quiet else lambda s: click.echo(s, err=True))
    result.update(model=str(model_path), dataset=dataset, attack=spec.attack.name, target=target)
    click.echo(format_table(result))
    if json_path is not None:
        write_json(json_path, result)
        if not quiet:
            click.echo(f"wrote {json_path}", err=True)
