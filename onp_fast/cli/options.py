"""Options shared by the commands that load a user's checkpoint, and the prologue that loads it with its data.

Preprocessing is part of the model: the normalisation comes from --mean/--std, else from the file, else (said so)
from the data set; the input size from --input-size, else the file or the weights, else the data."""
from __future__ import annotations

import dataclasses
import math

import click

from ..errors import UserError


def _numbers(ctx, param, value):
    """--mean / --std: "0.5" or "0.485,0.456,0.406" -> tuple of finite floats (std > 0)."""
    if value is None:
        return None
    try:
        vals = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number or comma-separated numbers") from None
    if not all(math.isfinite(v) for v in vals):
        raise click.BadParameter(f"{value!r} is not finite")
    if param.name == "std" and not all(v > 0 for v in vals):
        raise click.BadParameter(f"{value!r}: every std must be positive")
    return vals


def _checked_by(check):
    """A click callback that runs check(value) (a UserError becomes click's usage error, one line) and gives the
    value back stripped (None stays None)."""
    def callback(ctx, param, value):
        if value is None:
            return None
        try:
            check(value)
        except UserError as exc:
            raise click.BadParameter(str(exc)) from None
        return value.strip()
    return callback


def _device(ctx, param, value):
    """--device: checked against this machine at parse time (torchutil.check_device) -> the text, lower case."""
    from ..torchutil import check_device

    return _checked_by(check_device)(ctx, param, value).lower()


def _memory(ctx, param, value):
    """--max-memory: a size (memory.parse_memory) -> the text as given, checked; None when not given. Given, the
    allocator returns freed memory at once (`keep_freed_memory(False)`), so the resident memory follows the
    budgeted tensors."""
    from ..memory import parse_memory
    from ..torchutil import keep_freed_memory

    out = _checked_by(parse_memory)(ctx, param, value)
    if out is not None:
        keep_freed_memory(False)
    return out


def compute_options(f):
    """--device and --max-memory, for every command that runs a model (repair, compare, evaluate, scan); both
    checked while the command line is parsed, before anything is read or written. The command receives them
    as keyword arguments `device` and `max_memory` (the text: "cpu", "cuda:1"; "512MB")."""
    from ..memory import DEFAULT_MAX_MEMORY
    from ..torchutil import DEFAULT_DEVICE

    f = click.option("--max-memory", callback=_memory, default=None, metavar="SIZE",
                     help="Activation budget (e.g. 512MB, 4GB, 1.5GiB, plain bytes): inference, feature and "
                          "reward batches are split to stay under it; a training batch it cannot hold is an error "
                          f"before any work. Default: no budget (the reward engine chunks its masks to "
                          f"{DEFAULT_MAX_MEMORY}).")(f)
    return click.option("--device", callback=_device, default=DEFAULT_DEVICE, show_default=True,
                        help="Where the model runs: cpu, cuda or cuda:N (results are written from the CPU).")(f)


def checkpoint_options(f):
    """--arch and --trust-pickle (how to read the file), --mean/--std/--input-size (the model's preprocessing),
    --threads. The command receives them as keyword arguments of the same names; pass them on to
    `load_model_and_data`."""
    f = click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads for torch (the thread count changes float rounding, so results too).")(f)
    f = click.option("--input-size", type=click.IntRange(min=1), default=None,
                     help="Image side the model was trained at, where the file and weights cannot tell.")(f)
    f = click.option("--std", callback=_numbers, default=None,
                     help="Normalisation std per channel (x - mean) / std on [0, 1] pixels; one value or C values. "
                          "Default: the file's, else the data set's.")(f)
    f = click.option("--mean", callback=_numbers, default=None,
                     help="Normalisation mean per channel, with --std (e.g. --mean 0 --std 1 for raw [0, 1] pixels).")(f)
    f = click.option("--trust-pickle", is_flag=True,
                     help="Allow loading pickled (non-weights-only) checkpoints: runs code from the file.")(f)
    return click.option("--arch", default=None, help="Architecture, for checkpoints that do not record it.")(f)


def _families(ctx, param, value):
    """--trigger-families: comma-separated proxy family names -> the text, checked (`check_families`)."""
    from ..prepare.context import check_families

    return _checked_by(check_families)(ctx, param, value)


def trigger_families_option(f):
    """--trigger-families, for the commands that synthesise trigger proxies (repair, scan); checked while the
    command line is parsed. The command receives `trigger_families` (the text; RepairConfig takes it as is)."""
    from ..prepare.trigger import DEFAULT_FAMILIES, FAMILIES

    return click.option("--trigger-families", callback=_families, default=",".join(DEFAULT_FAMILIES),
                        show_default=True, metavar="NAMES",
                        help=f"Trigger-proxy families, comma-separated among {', '.join(FAMILIES)} (periodic: "
                             "stripes of any frequency over the whole image, for sinusoid-like triggers; blend: a picture mixed "
                             "into the whole image at a per-class strength, for blended triggers; warp: the image "
                             "resampled along a smooth flow, for warping triggers such as WaNet's).")(f)


def _purify_families(ctx, param, value):
    """--purify-families: comma-separated family names, or none -> the text, checked (`check_purify_families`)."""
    from ..prepare.context import check_purify_families

    return _checked_by(check_purify_families)(ctx, param, value)


def purify_families_option(f):
    """--purify-families, for repair: the proxy families synthesised for purification only (never the suspect;
    RepairConfig.purify_families). The command receives `purify_families` (the text; RepairConfig takes it as is)."""
    from ..prepare.trigger import DEFAULT_PURIFY_FAMILIES, FAMILIES

    return click.option("--purify-families", callback=_purify_families, default=",".join(DEFAULT_PURIFY_FAMILIES),
                        show_default=True, metavar="NAMES",
                        help=f"More trigger-proxy families among {', '.join(FAMILIES)}, or none: synthesised beside "
                             "--trigger-families and unlearned by proxy purification, never naming the suspect.")(f)


def accuracy_check_option(f):
    """--skip-accuracy-check, for the commands that run a defense on the model (`check_defense_accuracy`)."""
    return click.option("--skip-accuracy-check", is_flag=True,
                        help="Run even if the model's accuracy on the defense images is near chance.")(f)


def _per_channel(vals, channels: int, flag: str) -> tuple[float, ...]:
    if len(vals) == 1:
        return vals * channels
    if len(vals) != channels:
        raise UserError(f"{flag} has {len(vals)} values but the images have {channels} channels")
    return tuple(vals)


def check_mean_std(mean, std) -> None:
    """UserError unless --mean and --std are given together or not at all."""
    if (mean is None) != (std is None):
        raise UserError("--mean and --std go together: give both (e.g. --mean 0 --std 1 for raw [0, 1] pixels)")


def load_model_and_data(model_path, dataset: str, *, arch=None, trust_pickle: bool = False, mean=None, std=None,
                        input_size: int | None = None, threads: int | None = None, seed: int = 0,
                        device: str | None = None):
    """The prologue of every command that runs a user's model on a data set -> (loaded model, data splits, mean,
    std), checked to fit each other (channels, image size, classes) before any long work; the model is then
    moved to `device` (checked: torchutil.check_device).

    Normalisation: --mean/--std, else the file's, else the data set's statistics; `loaded.mean`/`.std` are set
    to what is used and `loaded.norm_source` says where it came from (so a written checkpoint records it).
    Input size: --input-size, else the file or the weights (ViT), else the data's (the model is rebuilt at that
    size when the weights cannot tell); a recorded size that differs from the data's is an error."""
    from ..data import load_dataset
    from ..io import check_model_fits, load_model

    check_mean_std(mean, std)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    loaded = load_model(model_path, arch=arch, trust_pickle=trust_pickle, input_size=input_size)
    if input_size is not None and loaded.input_shape[1] != input_size:
        raise UserError(f"--input-size {input_size} contradicts the file, which records "
                        f"{loaded.input_shape[1]}x{loaded.input_shape[2]} images")
    splits = load_dataset(dataset, seed=seed)
    c, h, w = splits.input_shape
    if not loaded.input_known and loaded.input_shape[1:] != (h, w):
        loaded = load_model(model_path, arch=arch, trust_pickle=trust_pickle, input_size=h)
    elif loaded.input_shape[1:] != (h, w) and loaded.input_shape[0] == c:
        where = "--input-size" if input_size is not None else "its file"
        raise UserError(f"the model takes {loaded.input_shape[1]}x{loaded.input_shape[2]} images ({where}) but "
                        f"{dataset} has {h}x{w}")
    if mean is not None:
        mean, std, source = _per_channel(mean, c, "--mean"), _per_channel(std, c, "--std"), "--mean/--std"
    elif loaded.mean is not None:
        mean, std, source = loaded.mean, loaded.std, "the model file"
    else:
        mean, std, source = splits.mean, splits.std, f"{dataset}'s statistics (the file records none)"
    loaded = dataclasses.replace(loaded, mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
                                 norm_source=source)
    check_model_fits(loaded, splits)
    if loaded.num_classes and loaded.num_classes != splits.num_classes:
        raise UserError(f"the model has {loaded.num_classes} classes, {dataset} has {splits.num_classes}")
    from ..torchutil import check_device

    if device is not None:
        loaded.model.to(check_device(device))
    return loaded, splits, loaded.mean, loaded.std


def data_files(spec: str) -> dict[str, str]:
    """The file a data set spec names (`npz:PATH`, `fashion-mnist:PATH`, ...) -> {"data set": PATH}, so that no
    output overwrites it ({} for a spec without a path)."""
    _, sep, path = spec.partition(":")
    return {"data set": path} if sep and path else {}


def defense_images(splits, defense_size: int | None, seed: int):
    """The clean defense images from the train split: `defense_size` of them, default every one up to 500 ->
    (x [N, C, H, W] pixels in [0, 1], y [N])."""
    from ..data import defense_subset

    available = int(splits.train_y.numel())
    n = min(500, available) if defense_size is None else defense_size
    if n < 1:
        raise UserError("--defense-size must be at least 1")
    if n > available:
        raise UserError(f"--defense-size {n} is more than the {available} clean images {splits.name} has")
    return defense_subset(splits, n, seed=seed)


# Normalisations tried when the model scores near chance, to name the likely fix.
_CANDIDATES = {"--mean 0 --std 1": (0.0, 1.0), "--mean 0.5 --std 0.5": (0.5, 0.5)}
_IMAGENET = ("--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225", ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))


def check_defense_accuracy(loaded, splits, x, y, *, skip: bool = False, echo=None, max_memory=None) -> float:
    """The model's accuracy on the defense images (x [N, C, H, W] pixels, y [N]) with the normalisation it will
    run with, printed through `echo`. Stops with a UserError naming the likely cause when the model is near
    chance (below 1/K + 0.15 (1 - 1/K)) or when another common normalisation scores at least 15 points more
    (the flags to pass are named); `skip` only prints. Batches within `max_memory` (train.predict).
    -> the accuracy in [0, 1]."""
    from ..train import accuracy

    acc = accuracy(loaded.model, x, y, loaded.mean, loaded.std, max_memory=max_memory)
    k = splits.num_classes
    where = f"mean {_fmt(loaded.mean)}, std {_fmt(loaded.std)} from {loaded.norm_source}"
    if not skip:
        _stop_if_wrong_preprocessing(loaded, splits, x, y, acc, where, max_memory)
    if echo is not None:
        echo(f"model accuracy on the {len(y)} defense images: {100 * acc:.1f}% (chance {100 / k:.1f}%; {where})")
    return acc


def _fmt(values) -> str:
    return ",".join(f"{v:.4g}" for v in values)


def _stop_if_wrong_preprocessing(loaded, splits, x, y, acc: float, where: str, max_memory=None) -> None:
    from ..train import accuracy

    k, c = splits.num_classes, x.shape[1]
    near_chance = acc < 1 / k + 0.15 * (1 - 1 / k)
    if not near_chance and acc > 0.85:  # no other normalisation can score 15 points more
        return
    candidates = {flags: (_per_channel((m,), c, ""), _per_channel((s,), c, "")) for flags, (m, s) in
                  _CANDIDATES.items()}
    if c == 3:
        candidates[_IMAGENET[0]] = _IMAGENET[1]
    candidates[f"--mean {_fmt(splits.mean)} --std {_fmt(splits.std)}"] = (tuple(splits.mean), tuple(splits.std))
    scored = {flags: accuracy(loaded.model, x, y, m, s, max_memory=max_memory) for flags, (m, s) in candidates.items()
              if (tuple(m), tuple(s)) != (tuple(loaded.mean), tuple(loaded.std))}
    best = max(scored, key=scored.get, default=None)
    better = best is not None and scored[best] >= acc + 0.15
    if near_chance or better:
        what = "near chance" if near_chance else "less than another normalisation gives"
        hint = f"; with {best} it scores {100 * scored[best]:.1f}%" if better else ""
        raise UserError(f"the model scores {100 * acc:.1f}% on the {len(y)} defense images, {what} (chance "
                        f"{100 / k:.1f}%; {where}){hint}: the preprocessing is likely not the model's; pass "
                        f"--mean/--std as it was trained (or --skip-accuracy-check)")
