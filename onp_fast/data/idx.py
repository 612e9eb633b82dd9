"""`fashion-mnist[:PATH]`, `mnist:PATH`: the four MNIST-format IDX files of a folder, gzip or not.

A folder holds train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and
t10k-labels-idx1-ubyte, each optionally with `.gz`. `fashion-mnist` without a path reads the folder where
Debian's `dataset-fashion-mnist` package puts them. IDX: a big-endian header (two zero bytes, a type code,
the number of dimensions, then each dimension as a uint32) and the data; images are uint8 [N, H, W], labels
uint8 [N]. Returns 1-channel images [N, 1, H, W] float32 in [0, 1].
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .splits import DataSplits, make_splits

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
         "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
_UBYTE = 0x08


def read_idx(path: Path, dims: int) -> np.ndarray:
    """The uint8 array of an IDX file (gzip or not) with `dims` dimensions; UserError naming the file when the
    header, the type or the length is wrong."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise UserError(f"cannot read {path}: {' '.join(str(exc).split())[:120]}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise UserError(f"{path} is not an IDX file (bad magic number)")
    if raw[2] != _UBYTE or raw[3] != dims:
        raise UserError(f"{path}: expected unsigned bytes in {dims} dimension(s), found type 0x{raw[2]:02x} in "
                        f"{raw[3]}")
    head = 4 + 4 * dims
    if len(raw) < head:
        raise UserError(f"{path} is truncated (header)")
    shape = struct.unpack(f">{dims}I", raw[4:head])
    size = int(np.prod(shape))
    if len(raw) != head + size:
        raise UserError(f"{path}: the header says {list(shape)} ({size} bytes), the file holds {len(raw) - head}")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{folder} has no {stem}[.gz] (an MNIST-format folder holds {', '.join(FILES.values())})")


def load_idx(name: str, path: str | None) -> DataSplits:
    """The IDX folder `path` (default: Debian's Fashion-MNIST folder) as DataSplits named `name`."""
    folder = Path(path or FASHION_MNIST_DIR).expanduser()
    if not folder.is_dir():
        hint = " (apt-get install dataset-fashion-mnist)" if path is None else ""
        raise UserError(f"{name}: folder not found: {folder}{hint}")
    arrays = {key: read_idx(_find(folder, stem), 3 if key.endswith("x") else 1) for key, stem in FILES.items()}
    x = {k: torch.from_numpy(arrays[k].copy()).unsqueeze(1).float().div_(255.0) for k in ("train_x", "test_x")}
    y = {k: torch.from_numpy(arrays[k].astype(np.int64)) for k in ("train_y", "test_y")}
    return make_splits(name, x["train_x"], y["train_y"], x["test_x"], y["test_y"])
