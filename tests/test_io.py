"""Model files: round trips for every format, refusal of code-running pickles, one-line errors."""
from __future__ import annotations

import os
import warnings
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn

from onp_fast import models
from onp_fast.data import load_dataset
from onp_fast.errors import UserError
from onp_fast.io import LoadedModel, check_model_fits, load_model, numpy_safe_globals, save_model
from onp_fast.seed import seed_everything


pytestmark = pytest.mark.usefixtures("one_thread")


class Evil:
    """Unpickling this creates the file `marker` (stands in for any code a checkpoint could run)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _model(name="preactresnet18", **kw) -> nn.Module:
    seed_everything(0)
    kw = {"width": 0.125, **kw}
    m = models.build(name, **kw)
    with torch.no_grad():  # non-trivial BN statistics so a lost buffer would show
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2), mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _same(a: nn.Module, b: nn.Module, x=X):
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


def test_ours_round_trip(tmp_path):
    m = _model()
    path = tmp_path / "m.pt"
    save_model(m, path, mean=torch.tensor([0.4, 0.5, 0.6]), std=[0.2, 0.2, 0.2], extra={"note": "x"})
    raw = torch.load(path, weights_only=True)  # plain types only
    assert raw["format"] == "onp-fast/v1" and raw["arch"] == "preactresnet18"
    lm = load_model(path)
    assert (lm.format, lm.arch, lm.num_classes, lm.input_shape) == ("onp-fast", "preactresnet18", 10, (3, 32, 32))
    assert lm.mean == pytest.approx((0.4, 0.5, 0.6)) and lm.extra == {"note": "x"}
    _same(m, lm.model)
    save_model(lm, tmp_path / "again.pt", extra={"pruned": [1, 2]})
    lm2 = load_model(tmp_path / "again.pt")
    assert lm2.format == "onp-fast" and lm2.extra == {"note": "x", "pruned": [1, 2]}
    _same(m, lm2.model)


def _backdoorbench_dict(m: nn.Module, extra=None) -> dict:
    return {
        "model_name": "preactresnet18",
        "num_classes": 10,
        "model": {f"module.{k}": v for k, v in m.state_dict().items()},
        "data_path": "./data/cifar10",
        "img_size": (32, 32, 3),
        "clean_data": "cifar10",
        "bd_train": {"x": np.arange(3 * 32 * 32 * 3, dtype=np.uint8).reshape(3, 32, 32, 3), "y": np.array([1, 2, 3]),
                     "poison_indicator": np.array([0.0, 1.0, 0.0]), "rate": np.float64(0.1)},
        "bd_test": None,
        **(extra or {}),
    }


def test_backdoorbench_round_trip_without_trust(tmp_path):
    m = _model()
    path = tmp_path / "attack_result.pt"
    torch.save(_backdoorbench_dict(m), path)
    lm = load_model(path)
    assert lm.format == "backdoorbench" and lm.arch == "preactresnet18" and lm.arch_kwargs["width"] == 0.125
    _same(m, lm.model)
    with torch.no_grad():  # a "repair": prune one channel
        lm.model.layer1[0].bn2.weight[3] = 0.0
    out = tmp_path / "defense_result.pt"
    save_model(lm, out)
    lm2 = load_model(out)
    assert lm2.format == "backdoorbench"
    _same(lm.model, lm2.model)
    with torch.serialization.safe_globals(numpy_safe_globals()):
        raw = torch.load(out, weights_only=True)
    assert all(k.startswith("module.") for k in raw["model"])
    assert float(raw["model"]["module.layer1.0.bn2.weight"][3]) == 0.0
    assert np.array_equal(raw["bd_train"]["x"], _backdoorbench_dict(m)["bd_train"]["x"])
    assert raw["img_size"] == (32, 32, 3) and raw["data_path"] == "./data/cifar10"


def test_backdoorbench_mobilenet_keeps_torchvision_strides(tmp_path):
    m = _model("mobilenet_v2", width=0.25, small=False)  # BackdoorBench trains torchvision's network
    bb = _backdoorbench_dict(m)
    torch.save(dict(bb, model_name="mobilenet_v2"), tmp_path / "bb.pt")
    lm = load_model(tmp_path / "bb.pt")
    assert lm.arch_kwargs["small"] is False
    _same(m, lm.model)


@pytest.mark.parametrize("wrap", [False, True])
def test_state_dict_round_trip_infers_options(tmp_path, wrap):
    m = _model("vgg16_bn", num_classes=4, in_channels=1)
    path = tmp_path / "sd.pt"
    torch.save({"state_dict": m.state_dict(), "epoch": 3} if wrap else m.state_dict(), path)
    with pytest.raises(UserError, match="pass --arch"):
        load_model(path)
    lm = load_model(path, arch="vgg16_bn")
    assert lm.format == "state_dict" and lm.num_classes == 4 and lm.input_shape[0] == 1
    assert lm.arch_kwargs["width"] == 0.125
    x = torch.randn(2, 1, 32, 32)
    _same(m, lm.model, x)
    save_model(lm, tmp_path / "out.pt")
    raw = torch.load(tmp_path / "out.pt", weights_only=True)
    assert (raw["epoch"] == 3) if wrap else ("features.0.weight" in raw)
    _same(m, load_model(tmp_path / "out.pt", arch="vgg16_bn").model, x)


def test_vit_state_dict_infers_input_size(tmp_path):
    m = _model("vit_small", width=0.5, depth=2, input_size=16, num_classes=3)
    torch.save(m.state_dict(), tmp_path / "vit.pt")
    lm = load_model(tmp_path / "vit.pt", arch="vit_small")
    assert lm.input_shape == (3, 16, 16) and lm.arch_kwargs["depth"] == 2
    _same(m, lm.model, torch.randn(2, 3, 16, 16))


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import save_file

    m = _model("resnet18")
    save_file(m.state_dict(), str(tmp_path / "m.safetensors"))
    lm = load_model(tmp_path / "m.safetensors", arch="resnet18")
    assert lm.format == "safetensors"
    _same(m, lm.model)
    save_model(lm, tmp_path / "out.safetensors", mean=[0.1, 0.2, 0.3], std=[1.0, 1.0, 1.0])
    lm2 = load_model(tmp_path / "out.safetensors")  # our metadata: no --arch needed
    assert lm2.arch == "resnet18" and lm2.mean == pytest.approx((0.1, 0.2, 0.3))
    _same(m, lm2.model)


def test_torchscript_round_trip(tmp_path):
    m = _model("resnet18")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.trace(m, X), str(tmp_path / "ts.pt"))
    lm = load_model(tmp_path / "ts.pt")
    assert lm.format == "torchscript" and lm.num_classes == 10
    _same(m, lm.model)
    ours = load_model(tmp_path / "ts.pt", arch="resnet18")  # rebuilt as a prunable module
    assert type(ours.model).__name__ == "ResNet"
    _same(m, ours.model)
    save_model(ours, tmp_path / "ts2.pt")
    _same(m, load_model(tmp_path / "ts2.pt").model)


def test_pickled_module_needs_trust(tmp_path):
    m = _model()
    torch.save(m, tmp_path / "full.pt")
    with pytest.raises(UserError, match="refusing to unpickle onp_fast.models.preact_resnet.PreActResNet"):
        load_model(tmp_path / "full.pt")
    lm = load_model(tmp_path / "full.pt", trust_pickle=True)
    assert lm.format == "pickle" and lm.arch == "preactresnet18"
    _same(m, lm.model)
    save_model(lm, tmp_path / "full2.pt")
    _same(m, load_model(tmp_path / "full2.pt", trust_pickle=True).model)


def _evil_files(tmp_path, marker) -> dict[str, os.PathLike]:
    m = _model()
    evil = Evil(marker)
    files = {}
    files["ours"] = tmp_path / "ours.pt"
    torch.save({"format": "onp-fast/v1", "arch": "preactresnet18", "arch_kwargs": {"width": 0.125},
                "state_dict": m.state_dict(), "extra": evil}, files["ours"])
    files["backdoorbench"] = tmp_path / "bb.pt"
    torch.save(_backdoorbench_dict(m, {"bd_test": evil}), files["backdoorbench"])
    files["state_dict_legacy"] = tmp_path / "legacy.pt"
    torch.save({**m.state_dict(), "x": evil}, files["state_dict_legacy"], _use_new_zipfile_serialization=False)
    m.payload = evil
    files["module"] = tmp_path / "module.pt"
    torch.save(m, files["module"])
    # a zip dressed up as TorchScript (has constants.pkl) whose data.pkl is the evil pickle
    files["torchscript"] = tmp_path / "ts.pt"
    with zipfile.ZipFile(files["ours"]) as src, zipfile.ZipFile(files["torchscript"], "w") as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item))
        dst.writestr("ours/constants.pkl", src.read("ours/data.pkl"))
    files["safetensors"] = tmp_path / "evil.safetensors"
    files["safetensors"].write_bytes(files["module"].read_bytes())
    return files


def test_code_running_pickles_are_refused_everywhere(tmp_path):
    marker = tmp_path / "pwned"
    files = _evil_files(tmp_path, marker)
    for kind, path in files.items():
        for arch in (None, "preactresnet18"):
            with pytest.raises(UserError) as err:
                load_model(path, arch=arch)
            msg = str(err.value)
            assert "\n" not in msg
            if kind not in ("torchscript", "safetensors"):
                assert "refusing to unpickle" in msg and "--trust-pickle" in msg, (kind, msg)
            assert not marker.exists(), kind
    lm = load_model(files["module"], trust_pickle=True)  # the user vouches: it loads (and the code ran)
    assert isinstance(lm.model, nn.Module) and marker.exists()


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        load_model(tmp_path / "empty.pt")
    m = _model()
    save_model(m, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        load_model(tmp_path / "trunc.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(UserError):
        load_model(tmp_path / "text.pt")


def _save(path, obj):
    torch.save(obj, path)
    return path


def test_wrong_arch_names_key_and_shapes(tmp_path):
    r50 = _save(tmp_path / "r50.pt", _model("resnet50").state_dict())
    with pytest.raises(UserError, match=r"'layer1.0.conv1.weight' has shape \[8, 8, 1, 1\] in the file "
                                        r"but \[8, 8, 3, 3\] in the model"):
        load_model(r50, arch="resnet18")
    r34 = _save(tmp_path / "r34.pt", _model("resnet34").state_dict())
    with pytest.raises(UserError, match=r"unexpected key 'layer1.2.conv1.weight'"):
        load_model(r34, arch="resnet18")
    r18 = _save(tmp_path / "r18.pt", _model("resnet18").state_dict())
    with pytest.raises(UserError, match=r"missing key 'layer1.2.conv1.weight'"):
        load_model(r18, arch="resnet34")
    preact = _save(tmp_path / "p.pt", _model().state_dict())
    with pytest.raises(UserError, match="no key 'fc.weight'"):
        load_model(preact, arch="resnet18")


def test_nan_weights_and_data_fit(tmp_path):
    m = _model()
    sd = m.state_dict()
    sd["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    with pytest.raises(UserError, match="layer2.0.conv1.weight"):
        load_model(tmp_path / "nan.pt", arch="preactresnet18")
    save_model(_model(), tmp_path / "rgb.pt")
    lm = load_model(tmp_path / "rgb.pt")
    digits = load_dataset("digits")
    with pytest.raises(UserError, match="3-channel input but digits has 1 channels"):
        check_model_fits(lm, digits)
    check_model_fits(lm, load_dataset("shapes:20:10"))
    lm_wrong = LoadedModel(lm.model, lm.arch, lm.arch_kwargs, 10, (1, 16, 16), None, None, "onp-fast")
    with pytest.raises(UserError, match="does not fit digits"):
        check_model_fits(lm_wrong, digits)
