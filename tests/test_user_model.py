"""A user's own model, safely (issue 20): preprocessing, input size, outputs that never clobber, options checked
before any work, one-line errors."""
import json
import os
import pickle
import stat

import pytest
import torch
from click.testing import CliRunner

from cli_helpers import one_line_error
from onp_fast import models
from onp_fast.cli import main
from onp_fast.data import load_dataset
from onp_fast.errors import UserError
from onp_fast.io import check_model_fits, load_model, save_model
from onp_fast.train import accuracy
from train_helpers import fit

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ["--method", "clp", "--purify", "none", "--quiet"]  # the fastest real repair


@pytest.fixture(scope="module")
def raw_model(tmp_path_factory):
    """A digits PreActResNet trained on raw [0, 1] pixels, saved as a bare state_dict -> (path, its own test
    accuracy, its accuracy on 100 defense images)."""
    splits = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    m = models.build("preactresnet18", num_classes=10, in_channels=1, width=0.125, input_size=16)
    fit(m, splits.train_x, splits.train_y, epochs=3)
    path = tmp_path_factory.mktemp("raw") / "raw_sd.pt"
    torch.save(m.state_dict(), path)
    return path, accuracy(m, splits.test_x, splits.test_y, (0.0,), (1.0,))


@pytest.fixture(scope="module")
def norm_model(tmp_path_factory):
    """The same kind of model trained on digits normalised with the data set's statistics, in our format."""
    splits = load_dataset("digits", seed=0)
    torch.manual_seed(1)
    m = models.build("preactresnet18", num_classes=10, in_channels=1, width=0.125, input_size=16)
    x = (splits.train_x - torch.tensor(splits.mean).view(1, -1, 1, 1)) / torch.tensor(splits.std).view(1, -1, 1, 1)
    fit(m, x, splits.train_y, epochs=3)
    path = tmp_path_factory.mktemp("norm") / "model.pt"
    save_model(m, path, mean=tuple(splits.mean), std=tuple(splits.std))
    return path


def _run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


# 1. outputs never clobber inputs or each other; existing outputs need --force; the umask's mode

def test_repair_refuses_to_write_over_its_input_or_one_output_over_another(norm_model, tmp_path):
    before = norm_model.read_bytes()
    one_line_error(_run(["repair", norm_model, "--dataset", "digits", "--out", norm_model, *QUICK]),
                   "same file as the model")
    assert norm_model.read_bytes() == before
    out = tmp_path / "o.pt"
    one_line_error(_run(["repair", norm_model, "--dataset", "digits", "--out", out, "--masks", out, *QUICK]),
                   "same file as the output")
    assert list(tmp_path.iterdir()) == []


def test_existing_outputs_need_force_and_get_the_umask_mode(norm_model, tmp_path):
    out = tmp_path / "o.pt"
    out.write_bytes(b"keep me")
    out.chmod(0o444)
    one_line_error(_run(["repair", norm_model, "--dataset", "digits", "--out", out, "--defense-size", "100",
                         *QUICK]), "exists", "--force")
    assert out.read_bytes() == b"keep me"
    old = os.umask(0o022)
    try:
        res = _run(["repair", norm_model, "--dataset", "digits", "--out", out, "--defense-size", "100", "--force",
                    *QUICK])
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    assert load_model(out).format == "onp-fast"
    for p in tmp_path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_attack_and_compare_outputs_are_guarded_too(norm_model, tmp_path):
    out = tmp_path / "m.pt"
    out.write_bytes(b"x")
    one_line_error(_run(["attack", "--dataset", "digits", "--attack", "badnets", "--arch", "preactresnet18",
                         "--out", out]), "exists", "--force")
    spec = tmp_path / "spec.json"
    spec.write_text("{}")
    one_line_error(_run(["compare", norm_model, "--dataset", "digits", "--attack-spec", spec, "--json", spec]),
                   "same file as the attack spec")


# 2. input size from the weights or the data; 3. preprocessing stated by the user

def test_a_bare_state_dict_takes_the_data_input_size_through_the_whole_workflow(raw_model):
    path, own = raw_model
    res = _run(["evaluate", path, "--arch", "preactresnet18", "--dataset", "digits", "--mean", "0", "--std", "1",
                "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["ca"] == pytest.approx(own)
    info = _run(["info", path, "--arch", "preactresnet18", "--json"])
    assert json.loads(info.output)["input_size_known"] is False
    info = _run(["info", path, "--arch", "preactresnet18", "--data", "digits", "--json"])
    assert json.loads(info.output)["input_shape"] == [1, 16, 16]


def test_a_recorded_input_size_that_differs_from_the_data_is_an_error(tmp_path):
    m = models.build("preactresnet18", num_classes=10, in_channels=1, width=0.125, input_size=32)
    save_model(m, tmp_path / "m32.pt")
    one_line_error(_run(["evaluate", tmp_path / "m32.pt", "--dataset", "digits"]), "32x32", "16x16")


def test_mean_std_flags_give_the_models_own_accuracy_and_the_check_stops_without_them(raw_model, tmp_path):
    path, own = raw_model
    out = tmp_path / "fixed.pt"
    base = ["repair", path, "--arch", "preactresnet18", "--dataset", "digits", "--out", out, "--defense-size", "100",
            "--method", "clp", "--purify", "none"]
    line = one_line_error(_run(base), "--mean 0 --std 1", "preprocessing")
    assert list(tmp_path.iterdir()) == []
    res = _run([*base, "--mean", "0", "--std", "1"])
    assert res.exit_code == 0, res.output
    splits = load_dataset("digits", seed=0)
    from onp_fast.data import defense_subset

    x, y = defense_subset(splits, 100, seed=0)
    model = load_model(path, arch="preactresnet18", input_size=16).model
    expected = accuracy(model, x, y, (0.0,), (1.0,))
    assert f"model accuracy on the 100 defense images: {100 * expected:.1f}%" in res.output
    report = json.loads((tmp_path / "fixed.report.json").read_text())
    assert report["preprocessing"]["mean"] == [0.0] and report["preprocessing"]["source"] == "--mean/--std"
    assert "cannot record preprocessing" in res.output  # a bare state_dict: said where it is recorded instead
    assert line.count("error:") == 1


def test_preprocessing_is_recorded_in_every_checkpoint_format_we_write(norm_model, tmp_path):
    lm = load_model(norm_model)
    for name in ("m.safetensors", "m.ts"):
        fmt = "safetensors" if name.endswith("safetensors") else "torchscript"
        import dataclasses

        save_model(dataclasses.replace(lm, format=fmt, mean=(0.25,), std=(0.5,)), tmp_path / name)
        back = load_model(tmp_path / name)
        assert back.mean == (0.25,) and back.std == (0.5,) and back.input_shape == (1, 16, 16), name
        assert back.input_known


def test_mean_and_std_are_checked(norm_model):
    for args, needle in ((["--mean", "0"], "go together"), (["--mean", "0", "--std", "0"], "positive"),
                         (["--mean", "a", "--std", "1"], "not a number"), (["--mean", "0,0", "--std", "1"],
                                                                           "2 values")):
        one_line_error(_run(["evaluate", norm_model, "--dataset", "digits", *args]), needle)


# 4. a defense set too small for the tolerance

def test_a_small_defense_set_raises_the_tolerance_and_says_so_or_refuses_an_explicit_one(norm_model, tmp_path):
    out = tmp_path / "o.pt"
    res = _run(["repair", norm_model, "--dataset", "digits", "--out", out, "--defense-size", "100", "--method",
                "clp", "--purify", "none"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert report["defense"]["n_val"] == 20 and report["defense"]["tolerance"] == pytest.approx(0.05)
    assert "raised from 2.0: one of the 20 images" in res.output
    one_line_error(_run(["repair", norm_model, "--dataset", "digits", "--out", tmp_path / "p.pt", "--defense-size",
                         "100", "--tolerance", "0.02", *QUICK]), "cannot resolve a tolerance of 0.02")


def test_defense_size_defaults_to_every_image_up_to_500(norm_model, tmp_path):
    import numpy as np

    splits = load_dataset("digits", seed=0)
    data = tmp_path / "d.npz"
    np.savez(data, x=splits.train_x[:250].numpy(), y=splits.train_y[:250].numpy(), num_classes=10)
    res = _run(["repair", norm_model, "--dataset", f"npz:{data}", "--out", tmp_path / "o.pt", "--method", "clp",
                "--purify", "none", "--skip-accuracy-check"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o.report.json").read_text())["defense"]["n"] == 200  # 250 less the test fifth


# 5. every option checked before any work; 7. click's usage errors are one line too

@pytest.mark.parametrize("args,needle", [
    (["--tolerance", "-1"], "--tolerance"), (["--tolerance", "5"], "--tolerance"),
    (["--tolerance", "inf"], "--tolerance"), (["--tolerance", "nan"], "tolerance"),
    (["--reward-weights", "ca_b=inf"], "ca_b=inf"), (["--reward-weights", "sparsity=-1"], "sparsity=-1"),
    (["--finetune-epochs", "-1"], "--finetune-epochs"), (["--threads", "0"], "--threads"),
    (["--seed", "abc"], "--seed"), (["--method", "magic"], "magic"), (["--purify", "all"], "--purify"),
    (["--defense-size", "0"], "--defense-size"), (["--samples", "1"], "--samples"),
    (["--device", "tpu"], "--device"), (["--max-memory", "lots"], "--max-memory"),
])
def test_bad_options_fail_in_one_line_before_any_work(args, needle, norm_model, tmp_path, monkeypatch):
    import onp_fast.io

    monkeypatch.setattr(onp_fast.io, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    one_line_error(_run(["repair", norm_model, "--dataset", "digits", "--out", tmp_path / "o.pt", *args]), needle)
    assert list(tmp_path.iterdir()) == []


def test_click_usage_errors_are_one_line(norm_model, tmp_path):
    one_line_error(_run(["repair", tmp_path, "--dataset", "digits"]), "is a directory")
    one_line_error(_run(["repair", norm_model, "--dataset", "digits", "--out", tmp_path]), "is a directory")
    one_line_error(_run(["evaluate", norm_model, "--dataset", "digits", "--batch-size", "0"]), "--batch-size")
    one_line_error(_run(["evaluate", norm_model]), "--dataset")
    one_line_error(_run(["nope"]), "nope")


# 8. pickles and npz files that are not what they say

def test_a_plain_pickle_is_refused_with_the_trust_flag_named_and_loads_with_it(tmp_path):
    m = models.build("preactresnet18", num_classes=10, in_channels=1, width=0.125, input_size=16)
    path = tmp_path / "m.pkl"
    with open(path, "wb") as f:
        pickle.dump(m.state_dict(), f)
    one_line_error(_run(["info", path, "--arch", "preactresnet18"]), "plain Python pickle", "--trust-pickle")
    res = _run(["info", path, "--arch", "preactresnet18", "--trust-pickle", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["format"] == "state_dict"


def test_a_text_file_named_npz_is_named_as_such(norm_model, tmp_path):
    (tmp_path / "d.npz").write_text("hello")
    line = one_line_error(_run(["evaluate", norm_model, "--dataset", f"npz:{tmp_path / 'd.npz'}"]),
                          "not an .npz archive")
    assert "allow_pickle" not in line


# 9. --threads; 10. words a defender understands

def test_threads_option_sets_torchs_thread_count(norm_model):
    before = torch.get_num_threads()
    try:
        assert _run(["evaluate", norm_model, "--dataset", "digits", "--threads", "1"]).exit_code == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_info_counts_the_groups_repair_prunes_and_explains_torchscript(norm_model, tmp_path):
    from onp_fast.groups import find_groups

    info = json.loads(_run(["info", norm_model, "--json"]).output)
    m = load_model(norm_model).model
    assert info["neuron_groups"] == find_groups(m, (1, 16, 16)).num_groups
    assert info["prunable_neurons"] > info["neuron_groups"]
    ts = tmp_path / "m.ts"
    torch.jit.save(torch.jit.trace(m, torch.zeros(1, 1, 16, 16)), str(ts))
    text = _run(["info", ts]).output
    assert "not prunable as TorchScript: pass --arch" in text


def test_a_nameless_data_set_is_not_called_none():
    m = models.build("preactresnet18", num_classes=10, in_channels=3, width=0.125, input_size=16)
    lm = load_model_from_module(m)

    class Data:
        name = None
        train_x = torch.zeros(2, 1, 16, 16)
        mean = (0.5,)
        std = (0.5,)

    with pytest.raises(UserError) as err:
        check_model_fits(lm, Data())
    assert "None" not in str(err.value) and "the data has 1 channels" in str(err.value)


def load_model_from_module(m):
    from onp_fast.io import LoadedModel

    return LoadedModel(m, "preactresnet18", {}, 10, (3, 16, 16), None, None, "onp-fast", {}, input_known=True)


def test_repair_summary_is_in_words(norm_model, tmp_path):
    res = _run(["repair", norm_model, "--dataset", "digits", "--out", tmp_path / "o.pt", "--defense-size", "100",
                "--method", "clp", "--purify", "sam", "--purify-epochs", "1"])
    assert res.exit_code == 0, res.output
    assert "how deep: the smallest cut that scores about as well as the best one" in res.output
    assert "purification (sharpness-aware fine-tuning)" in res.output
    assert "shallowest depth in" not in res.output  # the rule's formula stays in the report


def test_the_repair_plot_has_whole_iterations_every_layer_name_and_singular_words():
    import matplotlib

    matplotlib.use("Agg")
    from onp_fast.repair.output import plot_figure

    layers = {f"layer{i}.block{j}.conv{k}": 64 for i in range(4) for j in range(2) for k in range(3)}
    report = {"details": {"reward_curve": {"mean": [0.1, 0.2, 0.3], "max": [0.2, 0.3, 0.4]}},
              "layer_sizes": layers, "pruned_per_layer": {next(iter(layers)): 1}, "pruned_groups": 1}
    fig = plot_figure(report)
    curve, bars = fig.axes
    assert bars.get_title() == "pruned per layer (1 group)"
    ticks = [t for t in curve.get_xticks() if curve.get_xlim()[0] <= t <= curve.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    fig.canvas.draw()
    box = fig.bbox
    for label in bars.get_xticklabels():
        ext = label.get_window_extent()
        assert ext.y0 >= box.y0 - 0.5 and ext.x0 >= box.x0 - 0.5 and ext.x1 <= box.x1 + 0.5, label.get_text()
    assert len(bars.get_xticklabels()) == len(layers)
