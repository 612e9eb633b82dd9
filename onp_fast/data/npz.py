"""`npz:PATH`: a numpy .npz with arrays `x`, `y` and optionally `x_test`, `y_test` (else a seeded
stratified 80/20 split of x, y). Images are NHWC uint8 (0..255; NHW for one channel) or NCHW float in [0, 1].
The file is read with allow_pickle=False.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .splits import DataSplits, make_splits
from .subset import stratified_indices


def _images(a: np.ndarray, name: str, path: Path) -> torch.Tensor:
    """NHWC uint8 / NHW uint8 / NCHW float -> [N, C, H, W] float32 in [0, 1]."""
    if a.dtype == np.uint8:
        if a.ndim == 3:
            a = a[..., None]
        if a.ndim != 4:
            raise UserError(f"{path}: {name} has shape {list(a.shape)}; uint8 images must be [N, H, W, C] or [N, H, W]")
        return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float().div_(255.0)
    if np.issubdtype(a.dtype, np.floating):
        if a.ndim != 4:
            raise UserError(f"{path}: {name} has shape {list(a.shape)}; float images must be [N, C, H, W]")
        x = torch.from_numpy(np.ascontiguousarray(a)).float()
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise UserError(f"{path}: float images in {name} must lie in [0, 1] (found {float(x.min()):.3g}..{float(x.max()):.3g})")
        return x
    raise UserError(f"{path}: {name} has dtype {a.dtype}; use uint8 NHWC or float NCHW")


def _labels(a: np.ndarray, name: str, path: Path) -> torch.Tensor:
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise UserError(f"{path}: {name} has dtype {a.dtype}; labels must be integers")
    return torch.from_numpy(np.ascontiguousarray(a).reshape(-1))


def load_npz(path: str, seed: int = 0) -> DataSplits:
    """Arrays from the .npz at `path` (see module doc) as DataSplits."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"npz file not found: {path}")
    if not zipfile.is_zipfile(p):  # np.load would take it for a pickle and advise allow_pickle
        raise UserError(f"{p} is not an .npz archive (numpy.savez): truncated or another kind of file")
    try:
        with np.load(p, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"cannot read {p}: {' '.join(str(exc).split())[:160]}") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise UserError(f"{p} has no array {key!r} (found: {', '.join(arrays) or 'none'})")
    x, y = _images(arrays["x"], "x", p), _labels(arrays["y"], "y", p)
    if x.shape[0] == 0:
        raise UserError(f"{p}: x is empty")
    if "x_test" in arrays and "y_test" in arrays:
        test_x, test_y = _images(arrays["x_test"], "x_test", p), _labels(arrays["y_test"], "y_test", p)
        train_x, train_y = x, y
    else:
        if y.shape[0] != x.shape[0]:
            raise UserError(f"{p}: x has {x.shape[0]} images but y has {y.shape[0]} labels")
        if x.shape[0] < 2:
            raise UserError(f"{p}: {x.shape[0]} image(s): need at least 2 to split into train and test")
        test_idx = stratified_indices(y.long(), max(1, x.shape[0] // 5), seed)
        keep = torch.ones(x.shape[0], dtype=torch.bool)
        keep[test_idx] = False
        train_x, train_y, test_x, test_y = x[keep], y[keep], x[test_idx], y[test_idx]
    num_classes = int(arrays["num_classes"]) if "num_classes" in arrays else None
    return make_splits(f"npz:{p.name}", train_x, train_y, test_x, test_y, num_classes=num_classes)
