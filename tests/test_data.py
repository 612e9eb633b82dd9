"""Data sets: digits, shapes, CIFAR / folder / npz loaders on tiny files, defense subsets."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from onp_fast.data import defense_subset, load_dataset, normalize, stratified_indices
from onp_fast.errors import UserError


pytestmark = pytest.mark.usefixtures("one_thread")


def test_digits_fixed_stratified_split():
    d = load_dataset("digits")
    assert d.train_x.shape == (1437, 1, 16, 16) and d.test_x.shape == (360, 1, 16, 16)
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64 and d.num_classes == 10
    assert 0.0 <= float(d.train_x.min()) and float(d.train_x.max()) <= 1.0
    counts = torch.bincount(d.test_y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: 360 / 10 per class, +-1
    again = load_dataset("digits", seed=5)
    assert torch.equal(again.test_x, d.test_x) and torch.equal(again.train_y, d.train_y)
    flat = d.train_x.transpose(0, 1).reshape(1, -1)
    assert torch.allclose(d.mean, flat.mean(1)) and torch.allclose(d.std, flat.std(1), atol=1e-5)
    d.train_x.zero_()  # callers get copies: the cache is untouched
    assert load_dataset("digits").train_x.sum() > 0


def test_shapes_seeded_balanced_and_shape_not_colour():
    d = load_dataset("shapes:400:100", seed=1)
    assert d.train_x.shape == (400, 3, 32, 32) and d.test_x.shape == (100, 3, 32, 32)
    assert torch.bincount(d.train_y).tolist() == [40] * 10
    assert 0.0 <= float(d.train_x.min()) and float(d.train_x.max()) <= 1.0
    assert torch.equal(load_dataset("shapes:400:100", seed=1).train_x, d.train_x)
    assert not torch.equal(load_dataset("shapes:400:100", seed=2).train_x, d.train_x)
    assert load_dataset("shapes:50").test_x.shape[0] == 10
    # colour statistics alone do not tell the class
    from sklearn.linear_model import LogisticRegression

    big = load_dataset("shapes:2000:500", seed=3)
    feats = lambda x: torch.cat([x.mean((2, 3)), x.std((2, 3))], 1).numpy()  # noqa: E731
    clf = LogisticRegression(max_iter=500).fit(feats(big.train_x), big.train_y.numpy())
    assert clf.score(feats(big.test_x), big.test_y.numpy()) < 0.35


@pytest.mark.parametrize("spec", ["shapes:x", "shapes:0", "mnist", "cifar10", "shapes:1:2:3"])
def test_bad_specs(spec):
    with pytest.raises(UserError):
        load_dataset(spec)


def test_defense_subset_stratified_seeded_from_train():
    d = load_dataset("digits")
    x, y = defense_subset(d, 100, seed=0)
    assert x.shape == (100, 1, 16, 16) and torch.bincount(y, minlength=10).tolist() == [10] * 10
    idx = stratified_indices(d.train_y, 100, 0)
    assert torch.equal(x, d.train_x[idx]) and idx.max() < d.train_x.shape[0]
    x2, _ = defense_subset(d, 100, seed=0)
    x3, _ = defense_subset(d, 100, seed=1)
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    y_odd = torch.tensor([0] * 90 + [1] * 10)
    assert torch.bincount(y_odd[stratified_indices(y_odd, 20, 0)]).tolist() == [18, 2]
    with pytest.raises(UserError):
        defense_subset(d, 5000, seed=0)


def test_normalize():
    x = torch.ones(2, 3, 4, 4)
    out = normalize(x, torch.tensor([0.5, 0.25, 1.0]), [0.5, 0.25, 2.0])
    assert out[:, 0].eq(1).all() and out[:, 1].eq(3).all() and out[:, 2].eq(0).all()


def _cifar_batch(path, n, label_key, num_classes, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=n).tolist()
    with open(path, "wb") as f:
        pickle.dump({b"data": data, label_key: labels, b"batch_label": b"x"}, f)
    return data, labels


def test_cifar10_and_cifar100_folders(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    first, labels = _cifar_batch(root / "data_batch_1", 6, b"labels", 10, 0)
    for i in range(2, 6):
        _cifar_batch(root / f"data_batch_{i}", 6, b"labels", 10, i)
    _cifar_batch(root / "test_batch", 4, b"labels", 10, 9)
    d = load_dataset(f"cifar10:{tmp_path}")  # the parent folder works too
    assert d.train_x.shape == (30, 3, 32, 32) and d.test_x.shape == (4, 3, 32, 32) and d.num_classes == 10
    assert torch.allclose(d.train_x[0], torch.from_numpy(first[0].reshape(3, 32, 32)).float() / 255)
    assert d.train_y[:6].tolist() == labels
    c100 = tmp_path / "c100"
    c100.mkdir()
    _cifar_batch(c100 / "train", 8, b"fine_labels", 100, 1)
    _cifar_batch(c100 / "test", 3, b"fine_labels", 100, 2)
    d100 = load_dataset(f"cifar100:{c100}")
    assert d100.num_classes == 100 and d100.train_x.shape[0] == 8


def test_cifar_bad_inputs_and_evil_batch(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_dataset(f"cifar10:{tmp_path / 'nope'}")
    with pytest.raises(UserError, match="lacks data_batch_1"):
        load_dataset(f"cifar10:{tmp_path}")
    root = tmp_path / "c100"
    root.mkdir()
    _cifar_batch(root / "test", 3, b"fine_labels", 100, 2)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(root / "train", "wb") as f:
        pickle.dump({b"data": Evil(), b"fine_labels": [1]}, f)
    with pytest.raises(UserError, match="refusing to unpickle"):
        load_dataset(f"cifar100:{root}")
    assert not marker.exists()
    _cifar_batch(root / "train", 3, b"fine_labels", 100, 2)
    with open(root / "test", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [1, 100]}, f)
    with pytest.raises(UserError, match="label 100 is out of range"):
        load_dataset(f"cifar100:{root}")


def _png(path, size, colour, mode="RGB"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def test_folder_loader(tmp_path):
    for c, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        for i in range(5):
            _png(tmp_path / "flat" / c / f"{i}.png", (8, 8), colour)
    _png(tmp_path / "flat" / "dog" / "big.png", (16, 12), (0, 0, 255))  # resized to 8x8
    d = load_dataset(f"folder:{tmp_path / 'flat'}")
    assert d.num_classes == 2 and d.train_x.shape[1:] == (3, 8, 8)
    assert d.train_x.shape[0] + d.test_x.shape[0] == 11 and d.test_x.shape[0] == 2
    assert set(d.test_y.tolist()) == {0, 1}
    red = d.train_x[d.train_y == 0]
    assert torch.allclose(red[:, 0], torch.ones_like(red[:, 0])) and red[:, 2].max() == 0
    for split in ("train", "test"):
        for c in ("a", "b", "c"):
            _png(tmp_path / "split" / split / c / "0.png", (6, 6), 128, mode="L")
    ds = load_dataset(f"folder:{tmp_path / 'split'}")
    assert ds.train_x.shape == (3, 1, 6, 6) and ds.test_x.shape == (3, 1, 6, 6) and ds.num_classes == 3
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        load_dataset(f"folder:{tmp_path / 'empty'}")
    (tmp_path / "flat" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image"):
        load_dataset(f"folder:{tmp_path / 'flat'}")


def test_npz_loader(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(20, 5, 5, 3), dtype=np.uint8)
    y = np.arange(20) % 4
    np.savez(tmp_path / "a.npz", x=x, y=y)
    d = load_dataset(f"npz:{tmp_path / 'a.npz'}", seed=0)
    assert d.train_x.shape == (16, 3, 5, 5) and d.test_x.shape == (4, 3, 5, 5) and d.num_classes == 4
    assert torch.bincount(d.test_y).tolist() == [1, 1, 1, 1]
    xf = rng.random((6, 1, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "b.npz", x=xf, y=np.array([0, 1, 2, 0, 1, 2]), x_test=xf[:3], y_test=np.array([2, 1, 0]))
    b = load_dataset(f"npz:{tmp_path / 'b.npz'}")
    assert torch.equal(b.train_x, torch.from_numpy(xf)) and b.test_y.tolist() == [2, 1, 0]
    np.savez(tmp_path / "neg.npz", x=x, y=y - 1)
    with pytest.raises(UserError, match="out of range"):
        load_dataset(f"npz:{tmp_path / 'neg.npz'}")
    np.savez(tmp_path / "noy.npz", x=x)
    with pytest.raises(UserError, match="no array 'y'"):
        load_dataset(f"npz:{tmp_path / 'noy.npz'}")
    np.savez(tmp_path / "shape.npz", x=np.zeros((4, 2), np.uint8), y=np.zeros(4))
    with pytest.raises(UserError, match="shape"):
        load_dataset(f"npz:{tmp_path / 'shape.npz'}")
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 4, 4, 3), np.uint8), y=np.zeros(0))
    with pytest.raises(UserError, match="empty"):
        load_dataset(f"npz:{tmp_path / 'empty.npz'}")
    np.savez(tmp_path / "obj.npz", x=np.array([object()], dtype=object), y=np.zeros(1))
    with pytest.raises(UserError):
        load_dataset(f"npz:{tmp_path / 'obj.npz'}")
    assert not os.path.exists(tmp_path / "nope.npz")
    with pytest.raises(UserError, match="not found"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")


def test_a_split_of_one_image_per_class_still_holds_out_images():
    """40 classes of one image each (many classes, few images): the singletons are split as one pool, a fifth
    held out; classes with 2+ images keep their own share as before."""
    from onp_fast.data import stratified_split

    a, b = stratified_split(torch.arange(40), 0.2, seed=0)
    assert len(b) == 8 and len(a) == 32 and sorted(torch.cat([a, b]).tolist()) == list(range(40))
    assert stratified_split(torch.arange(40), 0.2, seed=1)[1].tolist() != b.tolist()  # seeded, not by class id
    y = torch.cat([torch.arange(10).repeat(5), torch.tensor([10, 11])])  # 10 classes of 5, two singletons
    a, b = stratified_split(y, 0.2, seed=0)
    assert all(int((y[b] == c).sum()) == 1 for c in range(10)) and len(b) == 10  # round(0.2 x 2) = 0 of the pool
    a, b = stratified_split(torch.tensor([0, 1]), 0.2, seed=0)
    assert len(a) == 1 and len(b) == 1  # b would be empty: one goes there
