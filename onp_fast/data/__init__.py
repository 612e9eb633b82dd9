"""Data sets as in-memory tensors: `load_dataset(spec, seed=0) -> DataSplits`.

Specs: `digits`, `shapes` / `shapes:NTRAIN` / `shapes:NTRAIN:NTEST`, `fashion-mnist[:PATH]`, `mnist:PATH`,
`cifar10:PATH`, `cifar100:PATH`, `folder:PATH`, `npz:PATH`. Pixels are float32 in [0, 1] ([N, C, H, W]); feed models `normalize(x, mean, std)`.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from ..errors import UserError
from .splits import DataSplits, channel_stats, make_splits, normalize
from .subset import defense_subset, shuffled_by_class, stratified_indices, stratified_split

SPECS = ["digits", "shapes[:NTRAIN[:NTEST]]", "fashion-mnist[:PATH]", "mnist:PATH", "cifar10:PATH", "cifar100:PATH", "folder:PATH", "npz:PATH"]


def _copy(splits: DataSplits) -> DataSplits:
    """A copy whose tensors the caller may edit in place without touching the cache."""
    return dataclasses.replace(
        splits, **{f.name: getattr(splits, f.name).clone() for f in dataclasses.fields(splits)
                   if hasattr(getattr(splits, f.name), "clone")}
    )


@functools.lru_cache(maxsize=2)
def _cached_idx(kind: str, path: str | None) -> DataSplits:
    """IDX folders are read (and gunzipped) once per process; load_dataset hands out copies."""
    from .idx import load_idx

    return load_idx(kind if path is None else f"{kind}:{Path(path).name}", path)


def load_dataset(spec: str, seed: int = 0) -> DataSplits:
    """Loads the data set named by `spec` (see module doc). `seed` drives generated data (shapes) and
    seeded splits (npz without a test split); digits' split is fixed. Bad specs/files raise UserError."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "digits" and not arg:
        from .digits import load_digits_splits

        return _copy(load_digits_splits())
    if kind == "shapes":
        from .shapes import DEFAULT_TEST, DEFAULT_TRAIN, load_shapes

        parts = [p for p in arg.split(":") if p] if arg else []
        try:
            sizes = [int(p.replace("_", "")) for p in parts]
        except ValueError:
            raise UserError(f"bad shapes spec {spec!r}: use shapes, shapes:NTRAIN or shapes:NTRAIN:NTEST") from None
        if len(sizes) > 2 or any(s < 1 for s in sizes):
            raise UserError(f"bad shapes spec {spec!r}: use shapes, shapes:NTRAIN or shapes:NTRAIN:NTEST")
        n_train = sizes[0] if sizes else DEFAULT_TRAIN
        n_test = sizes[1] if len(sizes) > 1 else (max(1, n_train // 5) if sizes else DEFAULT_TEST)
        return _copy(load_shapes(n_train, n_test, seed))
    if kind == "fashion-mnist" or (kind == "mnist" and arg):
        return _copy(_cached_idx(kind, arg or None))
    if kind in ("cifar10", "cifar100") and arg:
        from .cifar import load_cifar

        return load_cifar(arg, 10 if kind == "cifar10" else 100)
    if kind == "folder" and arg:
        from .folder import load_folder

        return load_folder(arg, seed)
    if kind == "npz" and arg:
        from .npz import load_npz

        return load_npz(arg, seed)
    raise UserError(f"unknown data set {spec!r}: use one of {', '.join(SPECS)}")


__all__ = ["DataSplits", "load_dataset", "defense_subset", "normalize", "make_splits", "channel_stats",
           "shuffled_by_class", "stratified_indices", "stratified_split", "SPECS"]
