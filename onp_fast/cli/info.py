"""`onp-fast info MODEL`: what a model file holds (arch, sizes, prunable neurons, input shape, format)."""
from __future__ import annotations

import json

import click

from .. import models
from ..io import load_model, parameter_count
from .options import load_model_and_data


@click.command("info")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--arch", default=None, help=f"architecture for weight-only files: {', '.join(models.names())}")
@click.option("--trust-pickle", is_flag=True, help="allow a fully pickled model (runs code from the file)")
@click.option("--data", "data_spec", default=None,
              help="also check the model fits this data set (digits, shapes, cifar10:PATH, ...) and give its accuracy")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
def command(model_path: str, arch: str | None, trust_pickle: bool, data_spec: str | None, as_json: bool) -> None:
    """Print a model file's architecture, parameter count, prunable-neuron count, input shape and format."""
    accuracy = None
    if data_spec is None:
        lm = load_model(model_path, arch=arch, trust_pickle=trust_pickle)
    else:
        from ..train import accuracy as top1

        lm, splits, mean, std = load_model_and_data(model_path, data_spec, arch=arch, trust_pickle=trust_pickle)
        accuracy = top1(lm.model, splits.test_x, splits.test_y, mean, std)
    info = {
        "arch": lm.arch,
        "format": lm.format,
        "parameters": parameter_count(lm.model),
        "prunable_neurons": models.prunable_neuron_count(lm.model),
        "num_classes": lm.num_classes,
        "input_shape": list(lm.input_shape),
        "arch_kwargs": lm.arch_kwargs,
        "mean": list(lm.mean) if lm.mean is not None else None,
        "std": list(lm.std) if lm.std is not None else None,
    }
    if data_spec is not None:
        info.update(data=data_spec, test_accuracy=accuracy)
    if as_json:
        click.echo(json.dumps(info))
        return
    shape = "x".join(str(s) for s in lm.input_shape)
    click.echo(f"arch:             {info['arch']}")
    click.echo(f"format:           {info['format']}")
    click.echo(f"parameters:       {info['parameters']:,}")
    click.echo(f"prunable neurons: {info['prunable_neurons']:,} (BatchNorm channels + ViT MLP units)")
    click.echo(f"classes:          {info['num_classes']}")
    click.echo(f"input shape:      {shape} (C x H x W)")
    opts = ", ".join(f"{k}={v}" for k, v in lm.arch_kwargs.items())
    click.echo(f"options:          {opts}")
    if lm.mean is not None:
        click.echo(f"normalisation:    mean {[round(m, 4) for m in lm.mean]}, std {[round(s, 4) for s in lm.std]}")
    if data_spec is not None:
        click.echo(f"fits {data_spec}:  yes, clean test accuracy {100 * accuracy:.2f}%")
