"""`onp-fast demo`: a BadNets digits model (trained once, cached), repaired by ONP, evaluated before and after."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ..errors import UserError


def _table(rows: list[tuple[str, dict]]) -> list[str]:
    out = [f"{'model':<10} {'CA':>7} {'ASR':>7} {'RA':>7}"]
    for name, r in rows:
        out.append(f"{name:<10} {100 * r['ca']:6.2f}% {100 * r['asr']:6.2f}% {100 * r['ra']:6.2f}%")
    return out


@click.command("demo")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=".onp_cache/demo", show_default=True,
              help="Where the backdoored model is cached (trained on the first run only) and outputs go.")
@click.option("--attack", "attack_name", default="badnets", show_default=True)
@click.option("--width", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--iterations", type=click.IntRange(min=1), default=None,
              help="RL iterations of the repair [default: repair's, 20].")
@click.option("--defense-size", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--graphs", is_flag=True, help="Instead: the neuron graphs of a built-in PreActResNet-18, per layer.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.pass_context
def command(ctx, cache_dir, attack_name, width, epochs, iterations, defense_size, seed, graphs, quiet):
    """Backdoor a digits PreActResNet-18 (cached), repair it with ONP, print CA / ASR / RA before and after."""
    if graphs:
        from ..bench.summary import run

        run(seed=seed, echo=click.echo)
        return
    from ..data import load_dataset
    from ..evaluate import attack_spec_path, evaluate, load_attack_spec
    from ..io import load_model
    from . import attack as attack_cli
    from . import repair as repair_cli

    cache = Path(cache_dir)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the cache folder {cache}: {exc.strerror}") from None
    model_path = cache / f"digits-{attack_name}-preactresnet18-w{width:g}-e{epochs}-s{seed}.pt"
    spec_path = attack_spec_path(model_path)
    if model_path.exists() and spec_path.exists():
        click.echo(f"using the cached backdoored model {model_path}")
    else:
        click.echo(f"training a backdoored model ({attack_name} on digits, preactresnet18 width {width:g}, "
                   f"{epochs} epochs); cached for the next run")
        ctx.invoke(attack_cli.command, dataset="digits", attack_name=attack_name, arch="preactresnet18",
                   width=width, epochs=epochs, poison_rate=0.1, target=0, seed=seed, batch_size=128, lr=None,
                   params=(), out=str(model_path), quiet=quiet)
    out = cache / f"{model_path.stem}.repaired.pt"
    start = time.perf_counter()
    ctx.invoke(repair_cli.command, model_path=str(model_path), dataset="digits", defense_size=defense_size,
               out_path=str(out), iterations=iterations, seed=seed, quiet=quiet, force=True,
               skip_accuracy_check=True)  # our own model, its preprocessing recorded: the line is still printed
    seconds = time.perf_counter() - start
    spec = load_attack_spec(spec_path)
    splits = load_dataset("digits", seed=seed)
    rows = []
    for name, path in (("backdoored", model_path), ("repaired", out)):
        loaded = load_model(path)
        rows.append((name, evaluate(loaded.model, splits.test_x, splits.test_y, loaded.mean, loaded.std,
                                    attack=spec.attack, target=spec.target)))
    click.echo(f"\n{attack_name} -> class {spec.target}, {int(splits.test_y.numel())} clean digits test images "
               f"(never seen by the repair), repair took {seconds:.0f} s:")
    for line in _table(rows):
        click.echo("  " + line)
    report = json.loads(out.with_name(out.stem + ".report.json").read_text())
    click.echo(f"  pruned {report['pruned_groups']} of {report['groups']['count']} neuron groups; "
               f"outputs in {cache}/")
