"""`onp-fast info MODEL`: what a model file holds (arch, sizes, neuron groups, input shape, preprocessing, format)
and what the other commands will assume where the file is silent."""
from __future__ import annotations

import json

import click

from .. import models
from ..errors import UserError
from ..io import load_model, parameter_count
from .options import check_mean_std, checkpoint_options, load_model_and_data


def _groups(lm) -> tuple[int | None, str | None]:
    """(prunable neuron groups, why none) of the loaded model; a TorchScript archive is not prunable as such."""
    if lm.arch == "torchscript":
        return None, f"not prunable as TorchScript: pass --arch (one of {', '.join(models.names())}) to rebuild it"
    from ..groups import find_groups

    try:
        return find_groups(lm.model, tuple(lm.input_shape)).num_groups, None
    except UserError as exc:
        return None, str(exc)


@click.command("info")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--data", "data_spec", default=None,
              help="also check the model fits this data set (digits, shapes, cifar10:PATH, ...) and give its accuracy")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
@checkpoint_options
def command(model_path: str, data_spec: str | None, as_json: bool, **model_opts) -> None:
    """Print a model file's architecture, parameters, neuron groups, input shape, preprocessing and format."""
    accuracy = None
    if data_spec is None:
        check_mean_std(model_opts["mean"], model_opts["std"])
        lm = load_model(model_path, arch=model_opts["arch"], trust_pickle=model_opts["trust_pickle"],
                        input_size=model_opts["input_size"])
        if model_opts["mean"] is not None:
            lm.mean, lm.std, lm.norm_source = model_opts["mean"], model_opts["std"], "--mean/--std"
        elif lm.mean is not None:
            lm.norm_source = "the model file"
    else:
        from ..train import accuracy as top1

        lm, splits, mean, std = load_model_and_data(model_path, data_spec, **model_opts)
        accuracy = top1(lm.model, splits.test_x, splits.test_y, mean, std)
    groups, no_groups = _groups(lm)
    info = {
        "arch": lm.arch,
        "format": lm.format,
        "parameters": parameter_count(lm.model),
        "prunable_neurons": models.prunable_neuron_count(lm.model) if groups is not None else 0,
        "neuron_groups": groups,
        "num_classes": lm.num_classes,
        "input_shape": list(lm.input_shape),
        "input_size_known": lm.input_known,
        "arch_kwargs": lm.arch_kwargs,
        "mean": list(lm.mean) if lm.mean is not None else None,
        "std": list(lm.std) if lm.std is not None else None,
        "normalisation_from": lm.norm_source,
    }
    if data_spec is not None:
        info.update(data=data_spec, test_accuracy=accuracy)
    if as_json:
        click.echo(json.dumps(info))
        return
    c, h, w = lm.input_shape
    click.echo(f"arch:             {info['arch']}")
    click.echo(f"format:           {info['format']}")
    click.echo(f"parameters:       {info['parameters']:,}")
    if groups is None:
        click.echo(f"prunable:         {no_groups}")
    else:
        click.echo(f"prunable:         {groups:,} neuron groups over {info['prunable_neurons']:,} neurons (BatchNorm "
                   f"channels + ViT MLP units; channels joined by a residual connection form one group)")
    click.echo(f"classes:          {info['num_classes']}")
    click.echo(f"input:            {c} channels, " + (f"{h}x{w} pixels" if lm.input_known or data_spec else
                                                     "size not recorded: the data's size is assumed "
                                                     "(--input-size to state it)"))
    opts = ", ".join(f"{k}={v}" for k, v in lm.arch_kwargs.items()
                     if k != "input_size" or lm.input_known or data_spec)
    click.echo(f"options:          {opts}")
    if lm.mean is not None:
        click.echo(f"normalisation:    (x - mean) / std, mean {[round(m, 4) for m in lm.mean]}, "
                   f"std {[round(s, 4) for s in lm.std]}, from {lm.norm_source}")
    else:
        click.echo("normalisation:    not recorded: the data set's statistics are assumed (--mean/--std to state "
                   "the model's, e.g. --mean 0 --std 1 for raw [0, 1] pixels)")
    if data_spec is not None:
        click.echo(f"fits {data_spec}:  yes, clean test accuracy {100 * accuracy:.2f}%")
