"""`onp-fast repair`: ONP on a model that may be backdoored, with a few hundred clean images."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from ..errors import UserError
from .options import checkpoint_options, load_model_and_data


def _default(out: Path, suffix: str) -> Path:
    return out.with_name(out.stem + suffix)


def _check_folder(path: Path | None, what: str) -> None:
    if path is not None and not path.resolve().parent.is_dir():
        raise UserError(f"{what} folder does not exist: {path.parent}")


def _weights(text: str | None):
    from ..reward import RewardWeights

    w = RewardWeights()
    if not text:
        return w
    for item in text.split(","):
        key, _, val = item.partition("=")
        if key.strip() not in w.to_dict():
            raise UserError(f"unknown reward term {key.strip()!r}: use {', '.join(w.to_dict())}")
        try:
            setattr(w, key.strip(), float(val))
        except ValueError:
            raise UserError(f"reward weight {item!r} is not KEY=NUMBER") from None
    return w


@click.command("repair")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--dataset", required=True, help="Where the clean defense images come from (train split only).")
@click.option("--defense-size", type=int, default=500, show_default=True, help="Clean images used by the defense.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Repaired model (default MODEL.repaired.EXT), in the input's format.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="JSON report (default OUT.report.json).")
@click.option("--masks", "masks_path", type=click.Path(dir_okay=False), default=None,
              help="Pruned groups as JSON (default OUT.masks.json).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="PNG: reward curve and pruned fraction per layer (default OUT.png).")
@click.option("--method", default="onp", show_default=True,
              help="Pruning defense: onp (ours), fp, anp, rnp or clp; every one uses the same held-out depth rule.")
@click.option("--iterations", type=int, default=None, help="ONP: RL iterations [default: 60].")
@click.option("--samples", type=int, default=None, help="ONP: masks scored per iteration (K) [default: 16].")
@click.option("--algorithm", type=click.Choice(["ppo", "reinforce"]), default=None, help="ONP: [default: ppo].")
@click.option("--reward-weights", default=None, help="e.g. ca_b=1,ca_t=1,ca_u=0,ca_p=0,sparsity=0.1")
@click.option("--tolerance", type=float, default=0.02, show_default=True,
              help="CA drop allowed on the held-out defense images when choosing the depth.")
@click.option("--reward-backend", type=click.Choice(["engine", "hooks"]), default="engine", show_default=True,
              help="How masks are scored: the batched reward engine, or one hooked forward per mask (the reference); "
                   "both give the same rewards.")
@click.option("--compact", "compact_model", is_flag=True,
              help="Remove pruned channels physically (written as TorchScript: its shapes no longer match the arch).")
@click.option("--purify", type=click.Choice(["auto", "none", "sam", "proxy", "sam+proxy"]), default="auto",
              show_default=True,
              help="After pruning: sharpness-aware fine-tuning (sam), unlearning the trigger proxies (proxy), both, "
                   "or none; auto: the method's default (onp: sam+proxy; the baselines: none).")
@click.option("--purify-epochs", type=int, default=10, show_default=True, help="Purification epochs on D_opt.")
@click.option("--purify-lr", type=float, default=None, help="Purification learning rate [default: RepairConfig's].")
@click.option("--purify-clip", type=float, default=None,
              help="Largest gradient norm of a purification step, 0 for none [default: RepairConfig's].")
@click.option("--finetune-epochs", type=int, default=0, show_default=True,
              help="Clean fine-tuning on the defense set afterwards, pruned channels held at zero.")
@click.option("--seed", type=int, default=0, show_default=True)
@checkpoint_options
@click.option("--quiet", is_flag=True, help="No progress output.")
def command(model_path, dataset, defense_size, out_path, report_path, masks_path, plot_path, method, iterations,
            samples, algorithm, reward_weights, tolerance, reward_backend, compact_model, purify, purify_epochs,
            purify_lr, purify_clip, finetune_epochs, seed,
            arch, trust_pickle, quiet):
    """Repair MODEL: prune the neurons an RL-trained GNN policy finds (or a baseline's), keeping clean accuracy."""
    from ..data import defense_subset, normalize
    from ..defenses import ONPConfig
    from ..defenses import get as get_defense
    from ..io import save_model
    from ..repair import RepairConfig, repair
    from ..repair.output import masks_json, write_json, write_plot

    src = Path(model_path)
    out = Path(out_path) if out_path else src.with_name(src.stem + ".repaired" + (src.suffix or ".pt"))
    report_p = Path(report_path) if report_path else _default(out, ".report.json")
    masks_p = Path(masks_path) if masks_path else _default(out, ".masks.json")
    plot_p = Path(plot_path) if plot_path else _default(out, ".png")
    for p, what in ((out, "output"), (report_p, "report"), (masks_p, "masks"), (plot_p, "plot")):
        _check_folder(p, what)
    method = get_defense(method).name  # unknown name: fail before loading anything
    onp_options = {"iterations": iterations, "samples": samples, "algorithm": algorithm}
    given = [f"--{k}" for k, v in onp_options.items() if v is not None]
    if given and method != "onp":
        raise UserError(f"{', '.join(given)} set ONP's policy training; --method {method} has none")
    onp = ONPConfig(**{k: v for k, v in onp_options.items() if v is not None})
    if defense_size < 1:
        raise UserError("--defense-size must be at least 1")
    if onp.iterations < 1 or onp.samples < 2:
        raise UserError("--iterations must be >= 1 and --samples >= 2")
    given_purify = {k: v for k, v in (("purify_lr", purify_lr), ("purify_clip", purify_clip)) if v is not None}
    cfg = RepairConfig(seed=seed, weights=_weights(reward_weights), tolerance=tolerance,
                       reward_backend=reward_backend, purify=purify, purify_epochs=purify_epochs, **given_purify,
                       finetune_epochs=finetune_epochs, compact=compact_model).check()

    loaded, splits, mean, std = load_model_and_data(model_path, dataset, arch=arch, trust_pickle=trust_pickle,
                                                    seed=seed)
    # Only the train split is read (defense images); the test split stays untouched.
    x, y = defense_subset(splits, defense_size, seed=seed)
    result = repair(loaded.model, normalize(x, mean, std), y, splits.num_classes, method,
                    cfg, onp if method == "onp" else None, progress=not quiet)
    report = dict(result.report)
    if compact_model:  # its shapes no longer match the architecture: written as TorchScript
        loaded = dataclasses.replace(loaded, model=result.compact, format="torchscript", source=None)
    else:
        loaded.model = result.model
    report.update(model=str(src), dataset=dataset, output=str(out))
    save_model(loaded, out, extra={"onp_repair": {"method": method, "pruned_groups": report["pruned_groups"],
                                                  "seed": seed}})
    write_json(masks_p, masks_json(result.groups, result.prune))
    write_plot(plot_p, report)
    write_json(report_p, report)
    if not quiet:
        t = report["times_s"]
        click.echo(f"pruned {report['pruned_groups']} of {report['groups']['count']} neuron groups "
                   f"(depth rule: {report['stopping_rule']['rule']})")
        for name, n in report["pruned_per_layer"].items():
            click.echo(f"  {name:<28} {n:>5} / {report['layer_sizes'][name]}")
        click.echo(f"CA on held-out defense images: {100 * report['ca_val_before']:.2f}% -> "
                   f"{100 * report['ca_val_after']:.2f}%")
        pur = report["purify"]
        if pur["mode"] != "none":
            click.echo(f"purification ({pur['mode']}, {pur['proxy_images_per_epoch']} proxy-stamped images an "
                       f"epoch): " + (f"kept {pur['kept_epochs']} of {pur['epochs']} epochs" if pur["kept"] else
                                      "undone: every epoch cost more than the tolerance on held-out images"))
        click.echo("time per phase (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
        rate = report["details"].get("policy_reward")
        if rate is not None:
            click.echo(f"policy reward ({rate['backend']}): {rate['masks']} masks, {rate['masks_per_s']} masks/s, "
                       f"{rate['images_per_s']} images/s")
        click.echo(f"wrote {out}, {masks_p}, {report_p}, {plot_p}")
