"""`onp-fast repair`: ONP on a model that may be backdoored, with a few hundred clean images."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import click

from ..errors import UserError
from ..torchutil import PRECISIONS
from .options import (accuracy_check_option, check_defense_accuracy, checkpoint_options, compute_options, data_files,
                      defense_images, load_model_and_data, purify_families_option, trigger_families_option)


def _default(out: Path, suffix: str) -> Path:
    return out.with_name(out.stem + suffix)


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
            value = float(val)
        except ValueError:
            raise UserError(f"reward weight {item!r} is not KEY=NUMBER") from None
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"reward weight {item!r} must be a finite number >= 0")
        setattr(w, key.strip(), value)
    return w


@click.command("repair")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--dataset", required=True, help="Where the clean defense images come from (train split only).")
@click.option("--defense-size", type=click.IntRange(min=1), default=None,
              help="Clean images used by the defense [default: every one available, up to 500].")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Repaired model (default MODEL.repaired.EXT), in the input's format.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="JSON report (default OUT.report.json).")
@click.option("--masks", "masks_path", type=click.Path(dir_okay=False), default=None,
              help="Pruned groups as JSON (default OUT.masks.json).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="PNG: reward curve and pruned fraction per layer (default OUT.png).")
@click.option("--trigger-image", "trigger_path", type=click.Path(dir_okay=False), default=None,
              help="PNG: the recovered trigger proxies beside clean and stamped images, per-class anomaly, as "
                   "`onp-fast scan --image` draws them (default OUT.trigger.png; not written without proxies).")
@click.option("--method", default="onp", show_default=True,
              help="Pruning defense: onp (ours), fp, anp, rnp or clp; every one uses the same held-out depth rule.")
@click.option("--iterations", type=click.IntRange(min=1), default=None, help="ONP: RL iterations [default: 20].")
@click.option("--samples", type=click.IntRange(min=2), default=None,
              help="ONP: masks scored per iteration (K) [default: 16].")
@click.option("--algorithm", type=click.Choice(["ppo", "reinforce"]), default=None, help="ONP: [default: ppo].")
@click.option("--actions", type=click.IntRange(min=0), default=None,
              help="ONP: the most groups the policy decides; a model with more has them screened by the exposure "
                   "features, the rest never pruned (0: every group) [default: 2048].")
@click.option("--reward-weights", default=None, help="e.g. ca_b=1,ca_t=1,ca_u=0,ca_p=0,sparsity=0.1")
@click.option("--trigger-steps", type=click.IntRange(min=1), default=None,
              help="Optimisation steps of the trigger proxies [default: 100 on images of 257 to 4,096 pixels "
                   "(e.g. 28 x 28 to 64 x 64), else 50; scaled down with a run of fewer RL iterations x samples than "
                   "ONP's defaults].")
@click.option("--trigger-batch", type=click.IntRange(min=1), default=None,
              help="Images per class in each step of the trigger proxies [default: 24 on images of 257 to "
                   "4,096 pixels, else 12; scaled down as the steps are].")
@click.option("--trigger-lr", type=float, default=None,
              help="Adam learning rate of the trigger proxies [default: 0.1 on images of 257 to 4,096 "
                   "pixels, else 0.2].")
@click.option("--tile-proxies/--no-tile-proxies", default=None,
              help="On a model that cuts its input into tiles (a ViT's patch embedding): run the patch proxies "
                   "6 times longer and fit the suspect class a patch proxy from each tile, for purification "
                   "[default: on, off with a run of fewer RL iterations x samples than ONP's defaults].")
@click.option("--tolerance", type=click.FloatRange(min=0, max=1, max_open=True), default=None,
              help="Accuracy drop (a fraction) allowed on the held-out defense images when choosing the depth "
                   "[default: 0.02, raised to one held-out image when there are fewer than 50].")
@click.option("--reward-backend", type=click.Choice(["engine", "hooks"]), default="engine", show_default=True,
              help="How masks are scored: the batched reward engine, or one hooked forward per mask (the reference); "
                   "both give the same rewards.")
@click.option("--reward-sequential", type=click.FloatRange(min=0, max=1, max_open=True), default=0.0,
              show_default=True,
              help="ONP's policy: score every mask on this share of the reward images first and stop scoring the "
                   "masks whose clean accuracy already fails the tolerance by three standard errors (0: off).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="float32", show_default=True,
              help="Precision of the policy's masks and of purification (autocast); the trigger proxies, the depth "
                   "rule and every accuracy check stay float32. bfloat16 needs a CPU with native bfloat16 "
                   "(AVX512-BF16 or AMX) or a GPU to be faster; float16 is for CUDA only.")
@click.option("--compact", "compact_model", is_flag=True,
              help="Remove pruned channels physically (written as TorchScript: its shapes no longer match the arch).")
@click.option("--purify", type=click.Choice(["auto", "none", "sam", "proxy", "sam+proxy"]), default="auto",
              show_default=True,
              help="After pruning: sharpness-aware fine-tuning (sam), unlearning the trigger proxies (proxy), both, "
                   "or none; auto: the method's default (onp: sam+proxy, or proxy on a model with tile proxies; the "
                   "baselines: none).")
@click.option("--purify-epochs", type=click.IntRange(min=0), default=None,
              help="Purification epochs on D_opt [default: 10, scaled down with a run of fewer RL iterations x "
                   "samples than ONP's defaults, as the trigger phase and the unlearning's most epochs (20) are].")
@click.option("--purify-rounds", type=click.IntRange(min=1), default=None,
              help="With tile proxies (a ViT): purification's rounds; between two, the tile proxies are fitted "
                   "again on the model as it is then [default: 2].")
@click.option("--purify-lr", type=float, default=None, help="Purification learning rate [default: RepairConfig's].")
@click.option("--purify-clip", type=float, default=None,
              help="Largest gradient norm of a purification step, 0 for none [default: RepairConfig's].")
@click.option("--purify-path", type=float, default=None,
              help="Path-aware purification a > -1: each step's gradient is taken at w0 + (1 + a)(w - w0), w0 the "
                   "pruned model; a < 0 carries the weights further from it (a more lasting removal, at some clean "
                   "accuracy), 0 off [default: RepairConfig's].")
@click.option("--finetune-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Clean fine-tuning on the defense set afterwards, pruned channels held at zero.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace output files that exist.")
@trigger_families_option
@purify_families_option
@checkpoint_options
@compute_options
@accuracy_check_option
@click.option("--quiet", is_flag=True, help="No progress output.")
def command(model_path, dataset, defense_size, out_path, report_path, masks_path, plot_path, trigger_path, method,
            iterations, samples, algorithm, actions, reward_weights, trigger_steps, trigger_batch,
            trigger_lr, tile_proxies, tolerance, reward_backend, reward_sequential,
            precision, compact_model, trigger_families, purify_families,
            purify,
            purify_epochs, purify_rounds, purify_lr, purify_clip, purify_path, finetune_epochs, seed, force,
            skip_accuracy_check, quiet, device, max_memory, **model_opts):
    """Repair MODEL: prune the neurons an RL-trained GNN policy finds (or a baseline's), keeping clean accuracy."""
    from ..atomic import check_outputs
    from ..data import normalize
    from ..defenses import ONPConfig
    from ..defenses import get as get_defense
    from ..distributed import init_from_env
    from ..io import save_model
    from ..prepare import with_effort
    from ..repair import RepairConfig, repair
    from ..repair.output import masks_json, write_json, write_plot, write_trigger_png

    src = Path(model_path)
    out = Path(out_path) if out_path else src.with_name(src.stem + ".repaired" + (src.suffix or ".pt"))
    report_p = Path(report_path) if report_path else _default(out, ".report.json")
    masks_p = Path(masks_path) if masks_path else _default(out, ".masks.json")
    plot_p = Path(plot_path) if plot_path else _default(out, ".png")
    trigger_p = Path(trigger_path) if trigger_path else _default(out, ".trigger.png")
    check_outputs({"output": out, "report": report_p, "masks": masks_p, "plot": plot_p, "trigger image": trigger_p},
                  {"model": src, **data_files(dataset)}, force)
    method = get_defense(method).name  # unknown name: fail before loading anything
    onp_options = {"iterations": iterations, "samples": samples, "algorithm": algorithm, "actions": actions}
    given = [f"--{k}" for k, v in onp_options.items() if v is not None]
    if given and method != "onp":
        raise UserError(f"{', '.join(given)} set ONP's policy training; --method {method} has none")
    onp = ONPConfig(**{k: v for k, v in onp_options.items() if v is not None})
    given = {k: v for k, v in (("purify_lr", purify_lr), ("purify_clip", purify_clip), ("purify_path", purify_path),
                               ("purify_rounds", purify_rounds),
                               ("tolerance", tolerance), ("trigger_lr", trigger_lr)) if v is not None}
    rank, _, device = init_from_env(device)  # under torchrun: mask scoring shared; rank 0 alone writes and talks
    quiet = quiet or rank > 0
    cfg = RepairConfig(seed=seed, weights=_weights(reward_weights), tolerance_auto=tolerance is None,
                       reward_backend=reward_backend, reward_sequential=reward_sequential, precision=precision,
                       trigger_steps=trigger_steps, trigger_batch=trigger_batch, trigger_families=trigger_families,
                       tile_proxies=tile_proxies,
                       purify_families=purify_families, purify=purify,
                       purify_epochs=purify_epochs, **given,
                       finetune_epochs=finetune_epochs, compact=compact_model, device=device,
                       max_memory=max_memory).check()
    loaded, splits, mean, std = load_model_and_data(model_path, dataset, seed=seed, device=device, **model_opts)
    # Only the train split is read (defense images); the test split stays untouched.
    x, y = defense_images(splits, defense_size, seed)
    # a short run (few RL iterations x samples) gets short trigger, unlearning and purification phases,
    # unless --trigger-steps (--trigger-batch) / --purify-epochs set them; the full ones follow the image size
    cfg = with_effort(cfg, [get_defense(method, onp if method == "onp" else None).effort()], x.shape)
    cfg = cfg.for_defense_set(y, splits.num_classes)  # too small for the tolerance: fail before any work
    check_defense_accuracy(loaded, splits, x, y, skip=skip_accuracy_check, max_memory=max_memory,
                           echo=None if quiet else lambda s: click.echo(s, err=True))
    result = repair(loaded.model, normalize(x, mean, std), y, splits.num_classes, method,
                    cfg, onp if method == "onp" else None, progress=not quiet, copy_model=False)
    report = dict(result.report)
    if compact_model:  # its shapes no longer match the architecture: written as TorchScript
        loaded = dataclasses.replace(loaded, model=result.compact, format="torchscript", source=None)
    else:
        loaded.model = result.model
    report.update(model=str(src), dataset=dataset, output=str(out),
                  preprocessing={"mean": list(mean), "std": list(std), "source": loaded.norm_source,
                                 "input_shape": list(loaded.input_shape)})
    if rank > 0:
        return
    save_model(loaded, out, extra={"onp_repair": {"method": method, "pruned_groups": report["pruned_groups"],
                                                  "seed": seed}})
    write_json(masks_p, masks_json(result.groups, result.prune))
    write_plot(plot_p, report)
    wrote = [out, masks_p, report_p, plot_p]
    if write_trigger_png(trigger_p, report, normalize(x, mean, std), y, mean, std):
        wrote.append(trigger_p)
    write_json(report_p, report)
    if not quiet:
        click.echo(summary(report, asked_tolerance=tolerance))
        click.echo("wrote " + ", ".join(str(p) for p in wrote))
    if loaded.format in ("state_dict", "backdoorbench", "pickle") and not quiet:
        click.echo(f"note: a {loaded.format} file cannot record preprocessing; the report does (mean "
                   f"{list(mean)}, std {list(std)}): pass the same --mean/--std when you load {out}", err=True)


def memory_line(part: dict) -> str:
    """The report's "peak_memory" part in one line: the process's peak resident memory (and CUDA's peak
    allocation), beside the budget (and the activations' share of it, when the part has "activation_bytes")
    and the device."""
    from ..memory import format_bytes

    cuda = part.get("cuda_max_allocated_bytes")
    gpu = f", CUDA {format_bytes(cuda)} allocated at most" if cuda is not None else ""
    share = f", {format_bytes(part['activation_bytes'])} of it for activations" if part.get("activation_bytes") else ""
    budget = ("no memory budget (--max-memory not given)" if part["max_memory_bytes"] is None else
              f"budget --max-memory {part['max_memory']} ({format_bytes(part['max_memory_bytes'])}{share})")
    return (f"peak memory: {format_bytes(part['rss_bytes'])} resident (the whole process){gpu}; {budget} on "
            f"{part['device']}")


def summary(report: dict, asked_tolerance: float | None = None) -> str:
    """What the repair did, in a defender's words (the report holds the numbers)."""
    d, pur, tp = report["defense"], report["purify"], report.get("trigger_proxy")
    lines = []
    if tp is not None:
        lines.append(f"trigger search: class {tp['target']} stands out (anomaly index {tp['anomaly_index']:.2f}, "
                     f"{tp['family']} trigger), so pruning favours what it uses" if tp["flagged"] else
                     f"trigger search: no class stands out (largest anomaly index {tp['anomaly_index']:.2f} < "
                     f"{report['config']['anomaly_threshold']}); pruning and purification run trigger-free")
    n, total = report["pruned_groups"], report["groups"]["count"]
    lines.append(f"pruned {n} of {total} neuron groups (a group: channels that must go together, e.g. across a "
                 f"residual connection)")
    for name, k in report["pruned_per_layer"].items():
        lines.append(f"  {name:<28} {k:>5} of {report['layer_sizes'][name]}")
    from ..repair import RepairConfig

    tol, default = d["tolerance"], RepairConfig.tolerance
    raised = f" (raised from {100 * default:.1f}: one of the {d['n_val']} images)" \
        if asked_tolerance is None and tol > default + 1e-12 else ""
    lines.append(f"how deep: the smallest cut that scores about as well as the best one, among the cuts that lose at "
                 f"most {100 * tol:.1f} points{raised} on {d['n_val']} defense images kept aside: accuracy there "
                 f"{100 * report['ca_val_before']:.1f}% -> {100 * report['ca_val_after']:.1f}%")
    if pur["mode"] != "none":
        what = {"sam": "sharpness-aware fine-tuning", "proxy": "fine-tuning on trigger-stamped copies with their "
                "true labels", "sam+proxy": "sharpness-aware fine-tuning on clean and trigger-stamped copies with "
                "their true labels"}[pur["mode"]]
        lines.append(f"purification ({what}): " + (
            f"kept {pur['kept_epochs']} of {pur['epochs']} epochs, accuracy on the kept-aside images "
            f"{100 * pur['ca_val_after']:.1f}%" if pur["kept"] else
            "undone: every epoch cost more than the allowed drop on the kept-aside images"))
        if pur.get("tile_proxies"):
            refits = pur["refits"]
            lines.append(f"  the copies carried {pur['tile_proxies']} tile proxies of class {pur['tile_class']}"
                         + (", fitted again after epoch " + ", ".join(str(r["after_epoch"]) for r in refits)
                            + " (kept: " + ", ".join(str(r["kept"]) for r in refits) + ")" if refits else ""))
    t = report["times_s"]
    lines.append("seconds per phase: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    lines.append(memory_line(report["peak_memory"]))
    rate = report["details"].get("policy_reward")
    if rate is not None:
        how = rate["backend"] + (f", {rate['precision']}" if rate.get("precision", "float32") != "float32" else "")
        lines.append(f"policy reward ({how}): {rate['masks']} masks, {rate['masks_per_s']} masks/s, "
                     f"{rate['images_per_s']} images/s"
                     + (f"; sequential test: first look {rate['sequential']:g} of the images, {rate['stopped']} "
                        "masks stopped there" if rate.get("sequential") else ""))
    return "\n".join(lines)
