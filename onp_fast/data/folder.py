"""`folder:PATH`: an image folder, one sub-folder per class (class index = sorted sub-folder name).

If PATH has `train/` and `test/` sub-folders, those are the splits (the same class names in both);
otherwise a seeded stratified 80/20 split is drawn. Every image is converted to RGB (or kept grayscale
when all images are) and must have the first image's size: other sizes are resized to it (bilinear),
so mixed sizes work but keep their aspect ratio only when they share one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .splits import DataSplits, make_splits
from .subset import stratified_indices

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


def _scan(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"image folder {root} has no class sub-folders")
    items = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).rglob("*"))
             if f.suffix.lower() in EXTENSIONS and f.is_file()]
    if not items:
        raise UserError(f"image folder {root} holds no images ({', '.join(sorted(EXTENSIONS))})")
    return classes, items


def _read(items: list[tuple[Path, int]], size: tuple[int, int] | None, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image, UnidentifiedImageError

    xs = []
    for f, _ in items:
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                if im.size != size:
                    im = im.resize(size, Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"cannot read image {f}: {' '.join(str(exc).split())[:120]}") from None
        xs.append(torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], -1).copy()))
    x = torch.stack(xs).permute(0, 3, 1, 2).float().div_(255.0)
    return x, torch.tensor([c for _, c in items], dtype=torch.int64)


def _mode_and_size(items: list[tuple[Path, int]]) -> tuple[str, tuple[int, int]]:
    from PIL import Image, UnidentifiedImageError

    gray = True
    size = None
    for f, _ in items:
        try:
            with Image.open(f) as im:
                size = size or im.size
                gray = gray and im.mode in ("L", "1", "I", "I;16", "F")
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"cannot read image {f}: {' '.join(str(exc).split())[:120]}") from None
    return ("L" if gray else "RGB"), size


def load_folder(path: str, seed: int = 0) -> DataSplits:
    """Images under `path` (see module doc) as DataSplits."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"image folder not found: {path}")
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes, train_items = _scan(root / "train")
        test_classes, test_items = _scan(root / "test")
        if test_classes != classes:
            raise UserError(f"image folder {root}: train classes {classes} differ from test classes {test_classes}")
        mode, size = _mode_and_size(train_items + test_items)
        train_x, train_y = _read(train_items, size, mode)
        test_x, test_y = _read(test_items, size, mode)
    else:
        classes, items = _scan(root)
        mode, size = _mode_and_size(items)
        x, y = _read(items, size, mode)
        n_test = max(1, len(items) // 5)
        if len(items) < 2:
            raise UserError(f"image folder {root} has {len(items)} image(s): need at least 2 to split")
        test_idx = stratified_indices(y, n_test, seed)
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[test_idx] = False
        train_x, train_y, test_x, test_y = x[keep], y[keep], x[test_idx], y[test_idx]
    return make_splits(f"folder:{root.name}", train_x, train_y, test_x, test_y, num_classes=len(classes))
