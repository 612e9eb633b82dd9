"""`onp-fast info`: what a model file holds; bad inputs give one line and exit code 2."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from cli_helpers import one_line_error
from click.testing import CliRunner

from onp_fast import models
from onp_fast.cli import main
from onp_fast.io import save_model


class Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _run(*args):
    return CliRunner().invoke(main, ["info", *map(str, args)])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("info")
    torch.manual_seed(0)
    m = models.build("preactresnet18", width=0.25)
    out = {"ours": root / "ours.pt", "sd": root / "sd.pt", "bb": root / "attack_result.pt"}
    save_model(m, out["ours"], mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    torch.save(m.state_dict(), out["sd"])
    torch.save({"model_name": "preactresnet18", "num_classes": 10, "img_size": (32, 32, 3),
                "model": {f"module.{k}": v for k, v in m.state_dict().items()},
                "clean_data": {"x": np.zeros((2, 32, 32, 3), np.uint8)}}, out["bb"])
    out["root"] = root
    return out


def test_info_ours(files):
    result = _run(files["ours"])
    assert result.exit_code == 0, result.output
    for text in ("arch:             preactresnet18", "format:           onp-fast", "parameters:       700,762",
                 "prunable:         720 neuron groups over 848 neurons", "input:            3 channels, 32x32 pixels"):
        assert text in result.output


def test_info_json_backdoorbench_and_state_dict(files):
    bb = json.loads(_run(files["bb"], "--json").output)
    assert bb["format"] == "backdoorbench" and bb["prunable_neurons"] == 848 and bb["input_shape"] == [3, 32, 32]
    sd = json.loads(_run(files["sd"], "--arch", "preactresnet18", "--json").output)
    assert sd["format"] == "state_dict" and sd["arch_kwargs"]["width"] == 0.25 and sd["parameters"] == 700762


def test_info_fit_to_data(files):
    ok = _run(files["ours"], "--data", "shapes:20:10")
    assert ok.exit_code == 0 and "fits shapes:20:10:  yes" in ok.output
    one_line_error(_run(files["ours"], "--data", "digits"), "3-channel input but digits has 1 channels")


def test_info_errors(files):
    root = files["root"]
    one_line_error(_run(root / "missing.pt"), "not found")
    (root / "empty.pt").write_bytes(b"")
    one_line_error(_run(root / "empty.pt"), "empty")
    data = files["ours"].read_bytes()
    (root / "trunc.pt").write_bytes(data[: len(data) // 3])
    one_line_error(_run(root / "trunc.pt"), "truncated")
    one_line_error(_run(files["sd"]), "pass --arch")
    one_line_error(_run(files["sd"], "--arch", "resnet18"), "no key 'fc.weight'")
    torch.save(models.build("resnet18", width=0.125, num_classes=3).state_dict(), root / "r18.pt")
    one_line_error(_run(root / "r18.pt", "--arch", "resnet34"), "missing key 'layer1.2.conv1.weight'")
    one_line_error(_run(files["sd"], "--arch", "alexnet"), "unknown architecture")


def test_info_refuses_code_and_trusts_on_request(files):
    root = files["root"]
    marker = root / "pwned"
    m = models.build("preactresnet18", width=0.125)
    m.payload = Evil(marker)
    torch.save(m, root / "evil.pt")
    one_line_error(_run(root / "evil.pt"), "refusing to unpickle", "--trust-pickle")
    assert not marker.exists()
    result = _run(root / "evil.pt", "--trust-pickle")
    assert result.exit_code == 0 and "format:           pickle" in result.output
    assert marker.exists()


def test_real_cli_no_traceback(files, tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"\x80\x02garbage")
    proc = subprocess.run([sys.executable, "-c", "from onp_fast.cli import main; main()", "info",
                           str(tmp_path / "bad.pt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
