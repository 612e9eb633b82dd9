"""`cifar10:PATH` / `cifar100:PATH`: the python-pickle CIFAR folders (cifar-10-batches-py: data_batch_1..5 and
test_batch; cifar-100-python: train and test). PATH may be the folder or its parent.

The batches are pickles of numpy arrays and lists only; they are read with a restricted unpickler that
accepts numpy's array reconstruction and nothing else, so a doctored batch cannot run code.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .splits import DataSplits, make_splits

_LAYOUT = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    100: ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _read_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise UserError(f"cannot read CIFAR batch {path}: {' '.join(str(exc).split())[:160]}") from None
    if not isinstance(obj, dict):
        raise UserError(f"CIFAR batch {path} is not a dict")
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def _stack(files: list[Path], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for f in files:
        batch = _read_batch(f)
        if b"data" not in batch or label_key not in batch:
            raise UserError(f"CIFAR batch {f} has no 'data' or '{label_key.decode()}' entry")
        data = np.asarray(batch[b"data"])
        if data.ndim != 2 or data.shape[1] != 3072:
            raise UserError(f"CIFAR batch {f}: data has shape {list(data.shape)}, expected [N, 3072]")
        xs.append(torch.from_numpy(data.astype(np.uint8).reshape(-1, 3, 32, 32)))
        ys.append(torch.as_tensor(np.asarray(batch[label_key], dtype=np.int64)))
    return torch.cat(xs).float().div_(255.0), torch.cat(ys)


def load_cifar(path: str, num_classes: int) -> DataSplits:
    """CIFAR-10 (num_classes=10) or CIFAR-100 (100, fine labels) from the python-pickle folder at `path`."""
    sub, train_names, test_names, label_key = _LAYOUT[num_classes]
    root = Path(path).expanduser()
    if (root / sub).is_dir():
        root = root / sub
    if not root.is_dir():
        raise UserError(f"CIFAR folder not found: {path}")
    missing = [n for n in train_names + test_names if not (root / n).is_file()]
    if missing:
        raise UserError(f"CIFAR-{num_classes} folder {root} lacks {missing[0]} (expected {', '.join(train_names + test_names)})")
    train_x, train_y = _stack([root / n for n in train_names], label_key)
    test_x, test_y = _stack([root / n for n in test_names], label_key)
    return make_splits(f"cifar{num_classes}", train_x, train_y, test_x, test_y, num_classes=num_classes)
