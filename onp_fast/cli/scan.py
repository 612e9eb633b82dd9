"""`onp-fast scan`: is MODEL backdoored, and towards which class? The trigger proxies repair synthesises, on clean
defense images, summarised per family and class; the verdict is repair's (same proxies, same gate)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .options import (accuracy_check_option, check_defense_accuracy, checkpoint_options, compute_options,
                      data_files, defense_images, load_model_and_data, trigger_families_option)

EXIT_FLAGGED = 3


def format_scan(result: dict) -> str:
    """Per family a table (class, proxy size, anomaly index; the most anomalous class marked), then the verdict."""
    from ..repair.scan_plot import verdict

    lines = []
    for f, fam in result["families"].items():
        lines.append(f"{f} family (proxy size: {'mask L1, pixels' if f == 'patch' else 'relative RMS of the delta'})")
        lines.append(f"  {'class':>5}  {'proxy size':>10}  {'anomaly index':>13}")
        classes = result.get("classes", range(len(fam["norms"])))
        for c, norm, z in zip(classes, fam["norms"], fam["z_scores"]):
            mark = "  <- most anomalous" if c == fam["class"] else ""
            lines.append(f"  {c:>5}  {norm:>10.4f}  {z:>13.2f}{mark}")
    lines.append(verdict(result))
    return "\n".join(lines)


@click.command("scan")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--dataset", required=True, help="Where the clean defense images come from (train split only).")
@click.option("--defense-size", type=click.IntRange(min=1), default=None,
              help="Clean images used [default: every train image, up to 500].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--image", "image_path", type=click.Path(dir_okay=False), default=None,
              help="Also write a PNG: the recovered triggers, clean and stamped examples, per-class anomaly.")
@click.option("--force", is_flag=True, help="Replace an existing --image file.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the defense subset and the proxies (repair with the same seed gives the same verdict).")
@click.option("--trigger-steps", type=click.IntRange(min=1), default=None,
              help="Optimisation steps of the proxies [default: by the image size, as a default repair].")
@trigger_families_option
@checkpoint_options
@compute_options
@accuracy_check_option
@click.option("--quiet", is_flag=True, help="No progress output.")
def command(model_path, dataset, defense_size, as_json, image_path, force, seed, trigger_steps, trigger_families,
            skip_accuracy_check, quiet, device, max_memory, **model_opts):
    """Scan MODEL for a backdoor: synthesise every class's smallest trigger (patch and additive families, more
    with --trigger-families) from
    clean images and flag a class whose trigger is anomalously small (MAD anomaly index >= 2), as repair does.

    \b
    Exit codes:
      0    no class stands out
      3    a class stands out: backdoor suspected
      2    bad input (one `error:` line)
      130  interrupted
    """
    from ..data import normalize
    from ..prepare import RepairConfig, scan_with_proxies
    from ..repair.scan_plot import pick_examples, shown_class, write_scan_png

    from ..atomic import check_outputs

    image = Path(image_path) if image_path else None
    check_outputs({"--image": image}, {"model": model_path, **data_files(dataset)}, force)
    loaded, splits, mean, std = load_model_and_data(model_path, dataset, seed=seed, device=device, **model_opts)
    # Only the train split is read (defense images); the test split stays untouched.
    x, y = defense_images(splits, defense_size, seed)
    check_defense_accuracy(loaded, splits, x, y, skip=skip_accuracy_check, max_memory=max_memory,
                           echo=None if quiet or as_json else lambda s: click.echo(s, err=True))
    xn = normalize(x, mean, std)
    cfg = RepairConfig(seed=seed, device=device, max_memory=max_memory, trigger_steps=trigger_steps,
                       trigger_families=trigger_families)
    result, proxies = scan_with_proxies(loaded.model, xn, y, splits.num_classes, cfg,
                                        progress=not (quiet or as_json))
    result = {"model": str(model_path), "dataset": dataset, **result}
    if image is not None:
        write_scan_png(image, result, proxies, pick_examples(xn, y, shown_class(result)), mean, std)
        result["image"] = str(image)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(format_scan(result))
        if not quiet:
            click.echo(f"{result['defense']['n']} defense images, {result['seconds']:.1f} s"
                       + (f"; wrote {image}" if image is not None else ""))
    if result["flagged"]:
        sys.exit(EXIT_FLAGGED)
