"""Options shared by the commands that load a user's checkpoint."""
from __future__ import annotations

import click


def checkpoint_options(f):
    """--arch (for checkpoints that do not record it) and --trust-pickle (the explicit trust flag)."""
    f = click.option("--trust-pickle", is_flag=True,
                     help="Allow loading pickled (non-weights-only) checkpoints: runs code from the file.")(f)
    return click.option("--arch", default=None, help="Architecture, for checkpoints that do not record it.")(f)


def load_model_and_data(model_path, dataset: str, *, arch=None, trust_pickle: bool = False, seed: int = 0):
    """The prologue of every command that runs a user's model on a data set -> (loaded model, data splits, mean,
    std): the model file and the data set, checked to fit each other (channels, image size, classes) before any
    long work; mean/std are the model's stored normalisation, else the data set's."""
    from ..data import load_dataset
    from ..errors import UserError
    from ..io import check_model_fits, load_model

    loaded = load_model(model_path, arch=arch, trust_pickle=trust_pickle)
    splits = load_dataset(dataset, seed=seed)
    check_model_fits(loaded, splits)
    if loaded.num_classes and loaded.num_classes != splits.num_classes:
        raise UserError(f"the model has {loaded.num_classes} classes, {dataset} has {splits.num_classes}")
    mean = splits.mean if loaded.mean is None else loaded.mean
    std = splits.std if loaded.std is None else loaded.std
    return loaded, splits, mean, std
