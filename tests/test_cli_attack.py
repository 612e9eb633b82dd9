"""`onp-fast attack` and `onp-fast evaluate`: a tiny end-to-end run, seeding, and one-line errors (exit 2)."""
import json

import pytest
import torch
from cli_helpers import one_line_error
from click.testing import CliRunner

from onp_fast.cli import main

TINY = ["--arch", "preactresnet18", "--width", "0.125", "--epochs", "1", "--quiet"]
N_TRAIN, N_TEST = 400, 120  # a digits subset keeps the end-to-end runs fast


def _run(args):
    return CliRunner().invoke(main, args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two identical-seed BadNets runs and one with another seed (tiny model, one epoch)."""
    import numpy as np

    from onp_fast.data import load_dataset

    root = tmp_path_factory.mktemp("attack")
    d = load_dataset("digits")
    data = root / "digits_small.npz"
    np.savez(data, x=d.train_x[:N_TRAIN].numpy(), y=d.train_y[:N_TRAIN].numpy(),
             x_test=d.test_x[:N_TEST].numpy(), y_test=d.test_y[:N_TEST].numpy())
    outs: dict = {"data": f"npz:{data}", "n_test_target": int((d.test_y[:N_TEST] == 0).sum())}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = root / f"{name}.pt"
        result = _run(["attack", *TINY, "--dataset", outs["data"], "--attack", "badnets", "--seed", str(seed),
                       "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert "ASR" in result.output
        outs[name] = out
    return outs


def _state(path):
    from onp_fast.io import load_model

    return load_model(path).model.state_dict()


def test_attack_writes_checkpoint_and_spec(trained):
    spec = json.loads(trained["a"].with_name("a.attack.json").read_text())
    assert spec["attack"]["name"] == "badnets" and spec["target"] == 0 and spec["poison_rate"] == 0.1
    assert spec["seed"] == 0 and spec["dataset"] == trained["data"]
    assert spec["split"]["n_train"] == N_TRAIN and spec["split"]["poisoned"] == N_TRAIN // 10
    assert spec["attack"]["image_shape"] == [1, 16, 16]
    assert not list(trained["a"].parent.glob(".*.tmp"))  # atomic writes leave no temp files


def test_same_seed_same_weights_and_metrics(trained):
    a, b, c = (_state(trained[k]) for k in "abc")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    spec_a = json.loads(trained["a"].with_name("a.attack.json").read_text())
    spec_b = json.loads(trained["b"].with_name("b.attack.json").read_text())
    assert spec_a["metrics"] == spec_b["metrics"]


def test_evaluate_reproduces_the_training_metrics(trained):
    spec_path = trained["a"].with_name("a.attack.json")
    data = trained["data"]
    result = _run(["evaluate", str(trained["a"]), "--dataset", data, "--attack-spec", str(spec_path), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    expected = json.loads(spec_path.read_text())["metrics"]
    assert got["n_test"] == N_TEST and got["n_triggered"] == N_TEST - trained["n_test_target"]  # target left out
    for key in ("ca", "asr", "ra"):
        assert got[key] == pytest.approx(expected[key], abs=1e-12)
    again = json.loads(_run(["evaluate", str(trained["b"]), "--dataset", data, "--attack-spec",
                             str(spec_path), "--json"]).output)
    assert {k: again[k] for k in ("ca", "asr", "ra")} == {k: got[k] for k in ("ca", "asr", "ra")}
    plain = _run(["evaluate", str(trained["a"]), "--dataset", data])
    assert plain.exit_code == 0 and "CA" in plain.output and "ASR" not in plain.output


def test_unknown_attack_lists_valid_names(tmp_path):
    result = _run(["attack", *TINY, "--dataset", "digits", "--attack", "nope", "--out", str(tmp_path / "m.pt")])
    one_line_error(result, "nope", "badnets", "blended", "sig", "wanet")


def test_unknown_dataset_lists_valid_ones(tmp_path):
    result = _run(["attack", "--dataset", "mnist", "--arch", "preactresnet18", "--attack", "badnets",
                   "--out", str(tmp_path / "m.pt")])
    one_line_error(result, "mnist", "digits", "shapes")


@pytest.mark.parametrize("rate", ["0", "-0.1", "1.5"])
def test_poison_rate_outside_unit_interval(tmp_path, rate):
    result = _run(["attack", *TINY, "--dataset", "digits", "--attack", "badnets", "--poison-rate", rate, "--out", str(tmp_path / "m.pt")])
    one_line_error(result, "poison rate", "(0, 1]")


@pytest.mark.parametrize("target", ["10", "-1"])
def test_target_outside_classes(tmp_path, target):
    result = _run(["attack", *TINY, "--dataset", "digits", "--attack", "badnets", "--target", target, "--out", str(tmp_path / "m.pt")])
    one_line_error(result, "target class", "0..9")


def test_spec_file_not_json(trained, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = _run(["evaluate", str(trained["a"]), "--dataset", "digits", "--attack-spec", str(bad)])
    one_line_error(result, "not valid JSON")
    missing = _run(["evaluate", str(trained["a"]), "--dataset", "digits", "--attack-spec", str(tmp_path / "x.json")])
    one_line_error(missing, "not found")


def test_errors_through_a_subprocess(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    proc = subprocess.run([sys.executable, "-c", "from onp_fast.cli import main; main()", "evaluate", str(tmp_path / "m.pt"),
                           "--dataset", "digits", "--attack-spec", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "not valid JSON" in proc.stderr
