"""MNIST-format IDX folders (`fashion-mnist[:PATH]`, `mnist:PATH`) on tiny files the tests write."""
import gzip
import struct

import numpy as np
import pytest
import torch

from onp_fast.data import load_dataset
from onp_fast.data.idx import FILES
from onp_fast.errors import UserError


def _idx(array: np.ndarray, type_code: int = 0x08) -> bytes:
    return bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write(folder, n_train=12, n_test=5, gz=False, size=6, **override):
    """A folder of the four IDX files: image i of a split is filled with value 10 * i, its label is i % 3."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data[f"{split}_x"] = (np.arange(n, dtype=np.uint8)[:, None, None] * 10 * np.ones((1, size, size), np.uint8))
        data[f"{split}_y"] = (np.arange(n) % 3).astype(np.uint8)
    for key, stem in FILES.items():
        raw = override.get(key, _idx(data[key]))
        (folder / (stem + (".gz" if gz else ""))).write_bytes(gzip.compress(raw) if gz else raw)
    return data


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("kind", ["mnist", "fashion-mnist"])
def test_idx_folder_loads_pixels_and_labels(tmp_path, gz, kind):
    data = _write(tmp_path / "d", gz=gz)
    s = load_dataset(f"{kind}:{tmp_path / 'd'}")
    assert s.train_x.shape == (12, 1, 6, 6) and s.test_x.shape == (5, 1, 6, 6) and s.num_classes == 3
    assert s.train_x.dtype == torch.float32 and float(s.train_x.max()) <= 1.0
    assert torch.equal(s.train_x[:, 0, 0, 0], torch.from_numpy(data["train_x"][:, 0, 0]).float() / 255)
    assert torch.equal(s.test_y, torch.from_numpy(data["test_y"]).long())
    assert s.name == f"{kind}:d"
    s.train_x.zero_()  # the caller's copy: the cached arrays stay intact
    assert float(load_dataset(f"{kind}:{tmp_path / 'd'}").train_x.max()) > 0


def test_idx_bad_folders_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="folder not found"):
        load_dataset(f"mnist:{tmp_path / 'absent'}")
    _write(tmp_path / "m")
    (tmp_path / "m" / FILES["test_y"]).unlink()
    with pytest.raises(UserError, match="has no t10k-labels-idx1-ubyte"):
        load_dataset(f"mnist:{tmp_path / 'm'}")
    bad = {
        "magic": (b"\x01\x02\x08\x03" + b"\x00" * 12, "not an IDX file"),
        "type": (_idx(np.zeros((2, 6, 6), np.float32).view(np.uint8)[:, :, :6], 0x0D), "expected unsigned bytes"),
        "truncated": (_idx(np.zeros((12, 6, 6), np.uint8))[:-5], "the file holds"),
        "dims": (_idx(np.zeros((12, 36), np.uint8)), "in 3 dimension"),
    }
    for case, (raw, needle) in bad.items():
        _write(tmp_path / case, train_x=raw)
        with pytest.raises(UserError, match=needle):
            load_dataset(f"mnist:{tmp_path / case}")
    _write(tmp_path / "gz", gz=True)
    (tmp_path / "gz" / (FILES["train_x"] + ".gz")).write_bytes(b"not gzip")
    with pytest.raises(UserError, match="cannot read"):
        load_dataset(f"mnist:{tmp_path / 'gz'}")
    _write(tmp_path / "labels", train_y=_idx(np.full(12, 7, np.uint8)), test_y=_idx(np.full(5, 200, np.uint8)))
    s = load_dataset(f"mnist:{tmp_path / 'labels'}")  # labels as found: classes = max + 1
    assert s.num_classes == 201


def test_mnist_needs_a_path():
    with pytest.raises(UserError, match="unknown data set 'mnist'"):
        load_dataset("mnist")


@pytest.mark.skipif(not (__import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir()),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_default_folder():
    s = load_dataset("fashion-mnist")
    assert s.train_x.shape == (60000, 1, 28, 28) and s.test_x.shape == (10000, 1, 28, 28) and s.num_classes == 10
