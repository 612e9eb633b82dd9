"""`onp-fast repair`: ONP on a model that may be backdoored, with a few hundred clean images."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import UserError
from .options import checkpoint_options


def _default(out: Path, suffix: str) -> Path:
    return out.with_name(out.stem + suffix)


def _check_folder(path: Path | None, what: str) -> None:
    if path is not None and not path.resolve().parent.is_dir():
        raise UserError(f"{what} folder does not exist: {path.parent}")


def _weights(text: str | None):
    from ..repair import RewardWeights

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


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _compacted(loaded, result, x):
    """The repaired model with pruned channels removed, checked against the masked model on x."""
    import dataclasses

    import torch

    from ..groups import compact

    small = compact(result.model, result.groups, result.prune).eval()
    with torch.no_grad():
        ref, out = result.model(x[:64]), small(x[:64])
    diff = float((out - ref).abs().max())
    if not torch.allclose(out, ref, rtol=1e-5, atol=1e-5):
        raise UserError(f"--compact: the compact model differs from the masked model by {diff:.2e}")
    return dataclasses.replace(loaded, model=small, format="torchscript", source=None,
                               extra={**loaded.extra, "_compact_diff": diff})


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
@click.option("--iterations", type=int, default=60, show_default=True, help="RL iterations.")
@click.option("--samples", type=int, default=16, show_default=True, help="Masks scored per iteration (K).")
@click.option("--algorithm", type=click.Choice(["ppo", "reinforce"]), default="ppo", show_default=True)
@click.option("--reward-weights", default=None, help="e.g. ca_b=1,ca_t=1,ca_u=0,ca_p=0,sparsity=0.1")
@click.option("--tolerance", type=float, default=0.02, show_default=True,
              help="CA drop allowed on the held-out defense images when choosing the depth.")
@click.option("--compact", "compact_model", is_flag=True,
              help="Remove pruned channels physically (written as TorchScript: its shapes no longer match the arch).")
@click.option("--finetune-epochs", type=int, default=0, show_default=True,
              help="Clean fine-tuning on the defense set afterwards, pruned channels held at zero.")
@click.option("--seed", type=int, default=0, show_default=True)
@checkpoint_options
@click.option("--quiet", is_flag=True, help="No progress output.")
def command(model_path, dataset, defense_size, out_path, report_path, masks_path, plot_path, method, iterations,
            samples, algorithm, reward_weights, tolerance, compact_model, finetune_epochs, seed, arch, trust_pickle,
            quiet):
    """Repair MODEL: prune the neurons an RL-trained GNN policy finds (or a baseline's), keeping clean accuracy."""
    from ..data import defense_subset, load_dataset, normalize
    from ..defenses import get as get_defense
    from ..defenses import run_defense
    from ..io import check_model_fits, load_model, save_model
    from ..repair import RepairConfig
    from ..repair.finetune import finetune_pruned
    from ..repair.output import masks_json, write_json, write_plot

    src = Path(model_path)
    out = Path(out_path) if out_path else src.with_name(src.stem + ".repaired" + (src.suffix or ".pt"))
    report_p = Path(report_path) if report_path else _default(out, ".report.json")
    masks_p = Path(masks_path) if masks_path else _default(out, ".masks.json")
    plot_p = Path(plot_path) if plot_path else _default(out, ".png")
    for p, what in ((out, "output"), (report_p, "report"), (masks_p, "masks"), (plot_p, "plot")):
        _check_folder(p, what)
    method = get_defense(method).name  # unknown name: fail before loading anything
    if defense_size < 1:
        raise UserError("--defense-size must be at least 1")
    if iterations < 1 or samples < 2:
        raise UserError("--iterations must be >= 1 and --samples >= 2")
    cfg = RepairConfig(iterations=iterations, samples=samples, seed=seed, algorithm=algorithm,
                       weights=_weights(reward_weights), tolerance=tolerance)

    loaded = load_model(model_path, arch=arch, trust_pickle=trust_pickle)
    splits = load_dataset(dataset, seed=seed)
    # Only the train split is read (defense images); the test split stays untouched.
    x, y = defense_subset(splits, defense_size, seed=seed)
    check_model_fits(loaded, x)
    if loaded.num_classes and loaded.num_classes != splits.num_classes:
        raise UserError(f"the model has {loaded.num_classes} classes, {dataset} has {splits.num_classes}")
    mean = splits.mean if loaded.mean is None else loaded.mean
    std = splits.std if loaded.std is None else loaded.std
    xn = normalize(x, mean, std)
    result = run_defense(method, loaded.model, xn, y, splits.num_classes, cfg, progress=not quiet)
    if finetune_epochs > 0:
        finetune_pruned(result.model, result.groups, result.prune, xn, y, epochs=finetune_epochs, seed=seed)
    report = dict(result.report)
    if compact_model:
        loaded = _compacted(loaded, result, xn)
        report["compact"] = {"parameters_before": _params(result.model), "parameters_after": _params(loaded.model),
                             "max_abs_diff": loaded.extra.pop("_compact_diff")}
    report.update(model=str(src), dataset=dataset, output=str(out), finetune_epochs=finetune_epochs)
    if not compact_model:
        loaded.model = result.model
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
        click.echo("time per phase (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
        click.echo(f"wrote {out}, {masks_p}, {report_p}, {plot_p}")
