"""ONP repair end to end on tiny models: determinism, no peeking, bad inputs, atomic outputs."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from cli_helpers import one_line_error

from onp_fast import models
from onp_fast.cli import main
from onp_fast.errors import UserError
from onp_fast.io import save_model
from onp_fast.defenses import ONPConfig
from onp_fast.repair import RepairConfig, repair

FAST = ["--iterations", "2", "--samples", "4", "--quiet", "--skip-accuracy-check"]  # tiny_ckpt is untrained


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    m = models.build("preactresnet18", num_classes=10, in_channels=1, width=0.125, input_size=16)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_model(m, path)
    return path


TINY_ONP = ONPConfig(iterations=2, samples=4)


def _tiny_cfg(**kw):
    return RepairConfig(reward_batch=32, perturbations=1, **kw)


def test_same_seed_same_masks():
    torch.manual_seed(0)
    m = models.build("preactresnet18", num_classes=4, in_channels=1, width=0.125, input_size=8).eval()
    x, y = torch.randn(24, 1, 8, 8), torch.arange(24) % 4
    a = repair(m, x, y, 4, "onp", _tiny_cfg(seed=3), TINY_ONP, progress=False)
    b = repair(m, x, y, 4, "onp", _tiny_cfg(seed=3), TINY_ONP, progress=False)
    assert torch.equal(a.prune, b.prune)
    assert a.report["details"]["reward_curve"] == b.report["details"]["reward_curve"]
    assert a.report["stopping_rule"]["table"] == b.report["stopping_rule"]["table"]


def test_reward_backends_give_the_same_masks_and_rewards():
    """The engine (default) and the hooked reference: same policy samples, same rewards, same pruned groups; the
    report names the backend and the policy phase's throughput."""
    torch.manual_seed(0)
    m = models.build("preactresnet18", num_classes=4, in_channels=1, width=0.125, input_size=8).eval()
    x, y = torch.randn(24, 1, 8, 8), torch.arange(24) % 4
    onp = ONPConfig(iterations=3, samples=4)
    assert RepairConfig().reward_backend == "engine"
    a = repair(m, x, y, 4, "onp", _tiny_cfg(seed=3, purify="none"), onp, progress=False)
    b = repair(m, x, y, 4, "onp", _tiny_cfg(seed=3, purify="none", reward_backend="hooks"), onp, progress=False)
    assert torch.equal(a.prune, b.prune)
    ca, cb = a.report["details"]["reward_curve"], b.report["details"]["reward_curve"]
    assert ca["prune_frac"] == cb["prune_frac"]  # the same masks were sampled
    assert ca["mean"] == pytest.approx(cb["mean"], abs=1e-5) and ca["max"] == pytest.approx(cb["max"], abs=1e-5)
    for row_a, row_b in zip(a.report["stopping_rule"]["table"], b.report["stopping_rule"]["table"]):
        assert row_a == pytest.approx(row_b, abs=1e-5)
    ra, rb = a.report["details"]["policy_reward"], b.report["details"]["policy_reward"]
    assert (ra["backend"], rb["backend"]) == ("engine", "hooks")
    assert ra["masks"] == rb["masks"] == 12 and ra["images"] == rb["images"] > 12 * 32 * 0.5
    assert ra["masks_per_s"] > 0 and ra["images_per_s"] == pytest.approx(ra["masks_per_s"] * ra["images"] / 12,
                                                                           rel=0.01)
    assert a.report["config"]["reward_backend"] == "engine"
    with pytest.raises(UserError, match="reward backend"):
        _tiny_cfg(reward_backend="fast").check()


def test_repair_rejects_bad_defense_sets():
    m = models.build("preactresnet18", num_classes=10, in_channels=1, width=0.125, input_size=8).eval()
    with pytest.raises(UserError, match="fewer than the 10 classes"):
        repair(m, torch.randn(5, 1, 8, 8), torch.arange(5), 10, "onp", _tiny_cfg(), TINY_ONP, progress=False)
    with pytest.raises(UserError, match="empty"):
        repair(m, torch.randn(0, 1, 8, 8), torch.zeros(0, dtype=torch.long), 10, "onp", _tiny_cfg(), TINY_ONP,
               progress=False)
    with pytest.raises(UserError, match="no prunable"):
        repair(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), torch.randn(20, 1, 8, 8), torch.arange(20) % 10,
               10, "onp", _tiny_cfg(), TINY_ONP, progress=False)


def test_cli_repair_writes_outputs_and_never_reads_test_split_or_attack_spec(tiny_ckpt, tmp_path, monkeypatch):
    import builtins

    import onp_fast.data as data_mod
    from onp_fast.data.splits import DataSplits

    (tiny_ckpt.parent / "tiny.attack.json").write_text('{"attack": {"name": "badnets"}, "target": 0}')
    real_load = data_mod.load_dataset

    class NoTestSplits(DataSplits):
        def __getattribute__(self, name):
            if name in ("test_x", "test_y"):
                raise AssertionError("repair read the test split")
            return super().__getattribute__(name)

    def guarded_load(spec, seed=0):
        s = real_load(spec, seed=seed)
        return NoTestSplits(s.name, s.train_x, s.train_y, s.test_x, s.test_y, s.num_classes, s.mean, s.std)

    real_open = builtins.open

    def guarded_open(file, *a, **k):
        assert not str(file).endswith(".attack.json"), "repair opened an attack spec"
        return real_open(file, *a, **k)

    monkeypatch.setattr(data_mod, "load_dataset", guarded_load)
    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(AssertionError(str(self)))
                        if str(self).endswith(".attack.json") else Path.read_bytes(self).decode())
    out = tmp_path / "fixed.pt"
    res = CliRunner().invoke(main, ["repair", str(tiny_ckpt), "--dataset", "digits", "--out", str(out),
                                    "--defense-size", "60", *FAST])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "fixed.report.json").read_text())
    assert report["defense"]["n"] == 60 and report["defense"]["n_val"] >= 10
    assert set(report["times_s"]) >= {"groups", "unlearn", "features", "graphs", "policy", "select"}
    masks = json.loads((tmp_path / "fixed.masks.json").read_text())
    assert masks["num_pruned"] == report["pruned_groups"]
    assert (tmp_path / "fixed.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "fixed.pt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cli_repair_purifies_after_pruning_and_reports_it(tiny_ckpt, tmp_path):
    out = tmp_path / "fixed.pt"
    res = CliRunner().invoke(main, ["repair", str(tiny_ckpt), "--dataset", "digits", "--out", str(out),
                                    "--defense-size", "60", "--method", "clp", "--purify", "sam",
                                    "--purify-epochs", "1", "--purify-lr", "0.002", "--purify-clip", "3",
                                    "--purify-path", "-0.25", "--purify-rounds", "3", "--skip-accuracy-check"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "fixed.report.json").read_text())
    assert report["config"]["purify_rounds"] == 3 and report["purify"]["rounds"] == 1  # a CNN: no tile proxies
    assert report["purify"]["mode"] == "sam" and report["purify"]["epochs"] == 1
    assert report["purify"]["lr"] == 0.002 and report["purify"]["grad_clip"] == 3
    assert report["purify"]["path_step"] == -0.25
    assert "purification (sharpness-aware fine-tuning): " + (
        "kept 1 of 1 epochs" if report["purify"]["kept"] else "undone") in res.output


@pytest.mark.parametrize("method", ["clp", "fp"])
def test_cli_repair_method_runs_a_baseline_through_the_same_depth_rule(method, tiny_ckpt, tmp_path):
    out = tmp_path / "fixed.pt"
    res = CliRunner().invoke(main, ["repair", str(tiny_ckpt), "--dataset", "digits", "--out", str(out),
                                    "--defense-size", "60", "--method", method, "--quiet",
                                    "--skip-accuracy-check"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "fixed.report.json").read_text())
    assert report["method"] == method and "reward_curve" not in report["details"]
    assert report["stopping_rule"]["rule"].startswith("shallowest depth")
    assert (tmp_path / "fixed.png").read_bytes()[:4] == b"\x89PNG"
    masks = json.loads((tmp_path / "fixed.masks.json").read_text())
    assert masks["num_pruned"] == report["pruned_groups"]


def _short_repair(tiny_ckpt, tmp_path, *options) -> tuple:
    """`onp-fast repair` of the tiny checkpoint with 2 x 4 masks and no purification, plus `options` -> (the
    result, the report); the run must succeed."""
    res = CliRunner().invoke(main, ["repair", str(tiny_ckpt), "--dataset", "digits", "--out",
                                    str(tmp_path / "fixed.pt"), "--defense-size", "60", "--purify", "none",
                                    "--iterations", "2", "--samples", "4", "--skip-accuracy-check", *options])
    assert res.exit_code == 0, res.output
    return res, json.loads((tmp_path / "fixed.report.json").read_text())


def test_cli_repair_reward_backend_option(tiny_ckpt, tmp_path):
    out = tmp_path / "fixed.pt"
    res, report = _short_repair(tiny_ckpt, tmp_path, "--reward-backend", "hooks")
    assert report["config"]["reward_backend"] == "hooks"
    assert report["details"]["policy_reward"]["backend"] == "hooks"
    assert "policy reward (hooks): 8 masks, " in res.output
    bad = CliRunner().invoke(main, ["repair", str(tiny_ckpt), "--dataset", "digits", "--out", str(out),
                                    "--reward-backend", "fast", *FAST])
    assert bad.exit_code == 2 and "fast" in bad.output


@pytest.mark.parametrize("case", ["missing_folder", "too_few_images", "wrong_channels", "no_prunable",
                                  "unknown_method", "onp_option_for_a_baseline", "zero_purify_lr",
                                  "negative_purify_clip", "purify_path_minus_one", "zero_purify_rounds"])
def test_cli_repair_bad_inputs(case, tiny_ckpt, tmp_path):
    model, extra = str(tiny_ckpt), ["--defense-size", "60"]
    out = tmp_path / "out.pt"
    if case == "missing_folder":
        out = tmp_path / "nope" / "out.pt"
    if case == "too_few_images":
        extra = ["--defense-size", "5"]
    if case == "wrong_channels":
        m = models.build("preactresnet18", num_classes=10, in_channels=3, width=0.125, input_size=16)
        model = str(tmp_path / "rgb.pt")
        save_model(m, model)
    if case == "unknown_method":
        extra += ["--method", "magic"]
    if case == "onp_option_for_a_baseline":
        extra += ["--method", "clp"]  # FAST sets --iterations and --samples, which only ONP has
    if case == "zero_purify_lr":
        extra += ["--purify-lr", "0"]
    if case == "negative_purify_clip":
        extra += ["--purify-clip", "-1"]
    if case == "purify_path_minus_one":
        extra += ["--purify-path", "-1"]
    if case == "zero_purify_rounds":
        extra += ["--purify-rounds", "0"]
    if case == "no_prunable":
        model = str(tmp_path / "linear.pt")
        torch.save(nn.Sequential(nn.Flatten(), nn.Linear(256, 10)), model)
        extra += ["--trust-pickle"]
    res = CliRunner().invoke(main, ["repair", model, "--dataset", "digits", "--out", str(out), *FAST, *extra])
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    assert not out.exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith("out")]


def test_ctrl_c_leaves_no_output(tiny_ckpt, tmp_path):
    out = tmp_path / "int.pt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "onp_fast.cli", "repair", str(tiny_ckpt), "--dataset", "digits", "--out", str(out),
         "--defense-size", "60", "--iterations", "500", "--samples", "4", "--skip-accuracy-check"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    seen = ""
    while time.time() < deadline:  # wait until the RL phase runs
        line = proc.stdout.readline()
        seen += line
        if "policy" in line or not line:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, seen + rest
    assert "Traceback" not in rest
    assert list(tmp_path.iterdir()) == []


def test_depth_rule_takes_the_shallowest_depth_near_the_best_reward():
    from onp_fast.repair import RewardWeights, choose_depth

    class Scorer:  # reward rises fast to depth 3, then creeps; CA_B falls past depth 6
        weights = RewardWeights(ca_b=1, ca_t=1, sparsity=0)

        def terms(self, prune):
            d = prune.sum(1).float()
            ca_t = torch.clamp(d / 3, max=1.0) * 0.9 + 0.001 * d
            ca_b = torch.where(d > 6, 1 - 0.05 * (d - 6), torch.ones_like(d))
            z = torch.zeros_like(d)
            return {"ca_b": ca_b, "ca_t": ca_t, "ca_u": z, "ca_p": z, "sparsity": z}

        def standard_error(self, prune):
            assert prune.sum() == 6  # asked at the best depth
            return self.se

    prob = torch.linspace(1, 0, 40)
    scorer = Scorer()
    scorer.se = 0.02
    assert choose_depth(prob, scorer, tolerance=0.02, max_depth=12)["depth"] == 3  # one SE (0.02) below the best
    scorer.se = 0.002  # a precise estimate: depth 3 (reward 1.903) falls outside best (1.906) - 0.002
    choice = choose_depth(prob, scorer, tolerance=0.02, max_depth=12)
    assert choice["depth"] == 4 and choice["margin"] == 0.002 and "standard error" in choice["rule"]
    assert choose_depth(prob, Scorer(), tolerance=0.02, slack=0.02, max_depth=12)["depth"] == 3
    assert choose_depth(prob, Scorer(), tolerance=0.02, slack=0.0, max_depth=12)["depth"] == 6  # best, CA_B ok
    assert choose_depth(prob, Scorer(), tolerance=0.2, slack=0.0, max_depth=12)["depth"] == 6  # CA_B cost wins


def test_standard_error_of_the_reward_is_the_binomial_one_for_accuracy():
    from onp_fast.groups import find_groups
    from onp_fast.reward import MaskScorer, RewardWeights

    torch.manual_seed(0)
    m = models.build("preactresnet18", num_classes=4, in_channels=1, width=0.125, input_size=8).eval()
    x, y = torch.randn(40, 1, 8, 8), torch.arange(40) % 4
    groups = find_groups(m, (1, 8, 8))
    scorer = MaskScorer(groups, m, x, y, RewardWeights(ca_b=2.0, ca_t=0, sparsity=0.5), batch_size=16)
    prune = torch.zeros(groups.num_groups, dtype=torch.bool)
    prune[:3] = True
    p = float(scorer.terms(prune.unsqueeze(0))["ca_b"][0])
    assert 0 < p < 1
    assert scorer.standard_error(prune) == pytest.approx(2.0 * (p * (1 - p) / (len(x) - 1)) ** 0.5, rel=1e-6)


def test_an_unflagged_trigger_proxy_does_not_steer_the_reward():
    from onp_fast.prepare import prepare

    torch.manual_seed(0)
    m = models.build("preactresnet18", num_classes=4, in_channels=1, width=0.125, input_size=8).eval()
    x, y = torch.randn(24, 1, 8, 8), torch.arange(24) % 4
    flagged = prepare(m, x, y, 4, _tiny_cfg(anomaly_threshold=-float("inf")), progress=False)
    assert flagged.trigger is flagged.proxy and flagged.proxy is not None
    never = prepare(m, x, y, 4, _tiny_cfg(anomaly_threshold=float("inf")), progress=False)
    assert never.trigger is None and never.proxy is not None
    assert never.scorer("val").x_t is None  # CA_T stays 0 for every mask
    assert torch.equal(never.proxy.pattern, flagged.proxy.pattern)  # same seed, same proxy


def test_finetune_holds_pruned_groups_at_zero_and_stays_finite():
    from onp_fast.groups import find_groups
    from onp_fast.prepare import finetune_pruned

    torch.manual_seed(0)
    m = models.build("preactresnet18", num_classes=4, in_channels=1, width=0.125, input_size=8).eval()
    x, y = torch.randn(65, 1, 8, 8), torch.arange(65) % 4  # 65: a last batch of one image is skipped
    groups = find_groups(m, (1, 8, 8))
    prune = torch.zeros(groups.num_groups, dtype=torch.bool)
    prune[torch.randperm(groups.num_groups)[:10]] = True
    before = {k: v.clone() for k, v in groups.prune_(m, ~prune).state_dict().items()}
    ft = finetune_pruned(m, groups, prune, x, y, epochs=3, lr=0.01, batch_size=16)
    assert not ft.training and all(torch.isfinite(p).all() for p in ft.parameters())
    assert not torch.equal(before["conv1.weight"], ft.conv1.weight)  # it trained
    assert not torch.equal(before["layer1.0.bn1.running_mean"], ft.layer1[0].bn1.running_mean)  # BN in train mode
    with torch.no_grad():
        plain = ft(x)
        with groups.masked(ft, (~prune).float()):
            masked = ft(x)
    torch.testing.assert_close(plain, masked, rtol=0, atol=1e-5)  # the pruned groups carry nothing


def test_a_model_of_more_classes_than_defense_images_is_repaired_with_screened_proxies():
    """40 images of 30 classes (as 40 images of an ImageNet model's 1,000): the split still gives D_val images,
    the trigger screen keeps trigger_classes of the 30 classes, and the run ends; fewer than 10 images is still
    refused before any work."""
    torch.manual_seed(0)
    m = models.build("preactresnet18", num_classes=30, in_channels=1, width=0.125, input_size=8).eval()
    x, y = torch.randn(40, 1, 8, 8), torch.arange(40) % 30
    res = repair(m, x, y, 30, "onp", _tiny_cfg(trigger_classes=6, purify="none"), TINY_ONP, progress=False)
    assert (res.report["defense"]["n_opt"], res.report["defense"]["n_val"]) == (26, 14)  # 10 + round(20 / 5)
    scan = res.report["trigger_proxy"]["scan"]
    assert len(scan["classes"]) == 6 and sum(scan["reference"]) == 3
    assert all(len(f["norms"]) == 6 for f in scan["families"].values())
    with pytest.raises(UserError, match="fewer than the 10 a defense needs"):
        repair(m, x[:9], y[:9], 30, "onp", _tiny_cfg(), TINY_ONP, progress=False)


DIGITS, SHAPES, IMAGENET = (1, 16, 16), (3, 32, 32), (3, 224, 224)


def test_the_trigger_phase_follows_the_effort_the_methods_ask_for():
    """ONP at 1 iteration x 2 masks (2 of the default 20 x 16 = 320 masks) gets 1 trigger step of 4 images per
    class on 16 x 16 images, the defaults 50 of 12; a baseline has no say (alone: 50 of 12); explicit settings are
    kept. On 32 x 32 images the full setting is 100 steps of 24 (the same 2 of 320 masks: 1 step of 15); on
    224 x 224 images 50 of 12 again (1 step of 4)."""
    from onp_fast.defenses import get
    from onp_fast.prepare import with_effort

    def steps_batch(cfg, *efforts, shape=DIGITS):
        c = with_effort(cfg, efforts, shape)
        return c.trigger_steps, c.trigger_batch

    assert get("onp", ONPConfig(iterations=1, samples=2)).effort() == pytest.approx(2 / 320)
    assert steps_batch(RepairConfig(), get("onp", ONPConfig(iterations=1, samples=2)).effort()) == (1, 4)
    assert steps_batch(RepairConfig(), get("onp", ONPConfig(iterations=10, samples=16)).effort()) == (25, 12)
    assert steps_batch(RepairConfig(), get("onp", ONPConfig(iterations=60, samples=16)).effort()) == (50, 12)
    assert steps_batch(RepairConfig(), get("onp").effort()) == (50, 12)
    assert get("fp").effort() is None and steps_batch(RepairConfig(), get("fp").effort()) == (50, 12)
    assert steps_batch(RepairConfig(), get("fp").effort(), 0.01) == (1, 6)  # fp has no say: ONP's 0.01 rules
    assert steps_batch(RepairConfig(trigger_steps=7), 0.01) == (7, 12)
    assert steps_batch(RepairConfig(trigger_batch=3), 1.0) == (50, 3)
    assert steps_batch(RepairConfig(), get("onp").effort(), shape=SHAPES) == (100, 24)
    assert steps_batch(RepairConfig(), get("onp", ONPConfig(iterations=1, samples=2)).effort(),
                       shape=SHAPES) == (1, 15)
    assert steps_batch(RepairConfig(), get("onp", ONPConfig(iterations=10, samples=16)).effort(),
                       shape=SHAPES) == (50, 24)
    assert steps_batch(RepairConfig(trigger_steps=7), 0.01, shape=SHAPES) == (7, 24)
    assert steps_batch(RepairConfig(), get("onp", ONPConfig(iterations=1, samples=2)).effort(),
                       shape=IMAGENET) == (1, 4)  # the short 224-px runs of issue 18 stay short
    for key in ("trigger_steps", "trigger_batch", "unlearn_epochs"):
        with pytest.raises(UserError, match=key):
            RepairConfig(**{key: 0}).check()
    for lr in (0.0, -0.1, float("nan")):
        with pytest.raises(UserError, match="trigger_lr"):
            RepairConfig(trigger_lr=lr).check()


def test_the_full_trigger_setting_follows_the_image_size():
    """Up to 16 x 16 pixels: 50 steps of 12 images at lr 0.2 (measured on the digits models); 257 to 4,096
    pixels (28 x 28 to 64 x 64): 100 of 24 at 0.1 (the faster one misses the 32 x 32 shapes backdoor); larger
    images: 50 of 12 at 0.2 again (cost). The effort rule and prepare's keywords both follow it; a rate set by
    hand is kept."""
    from onp_fast.prepare import trigger_settings, with_effort
    from onp_fast.prepare.trigger import trigger_setting

    assert trigger_setting((8, 8)) == trigger_setting(DIGITS) == (50, 12, 0.2)
    assert trigger_setting((1, 17, 16)) == trigger_setting((1, 28, 28)) == trigger_setting(SHAPES) == (100, 24, 0.1)
    assert trigger_setting((3, 64, 64)) == (100, 24, 0.1)
    assert trigger_setting((3, 65, 64)) == trigger_setting(IMAGENET) == (50, 12, 0.2)
    for shape in (DIGITS, (1, 28, 28), SHAPES, IMAGENET):
        kw = trigger_settings(RepairConfig().check(), (7, *shape))
        assert (kw["steps"], kw["batch"], kw["lr"]) == trigger_setting(shape)
        assert with_effort(RepairConfig(), [1.0], shape).trigger_lr == trigger_setting(shape)[2]
    assert trigger_settings(RepairConfig(trigger_lr=0.05).check(), SHAPES)["lr"] == 0.05
    assert with_effort(RepairConfig(trigger_lr=0.05), [1.0], SHAPES).trigger_lr == 0.05


def test_prepare_and_the_report_use_the_image_size_trigger_setting(monkeypatch):
    """Planted: prepare on 32 x 32 images hands synthesize_proxies 100 steps of 24 at lr 0.1, on 8 x 8 images
    50 of 12 at 0.2, and the report's trigger_proxy.setting says the same (the proxies run 1 step here)."""
    import onp_fast.prepare.context as context_mod

    seen = []
    real = context_mod.synthesize_proxies

    def spy(*a, **k):
        seen.append((k["steps"], k["batch"], k["lr"]))
        return real(*a, **{**k, "steps": 1, "batch": 2})

    monkeypatch.setattr(context_mod, "synthesize_proxies", spy)
    for side, want in ((32, (100, 24, 0.1)), (8, (50, 12, 0.2))):
        torch.manual_seed(0)
        m = models.build("preactresnet18", num_classes=4, in_channels=1, width=0.125, input_size=side).eval()
        x, y = torch.randn(24, 1, side, side), torch.arange(24) % 4
        res = repair(m, x, y, 4, "onp", _tiny_cfg(purify="none"), ONPConfig(iterations=1, samples=2),
                     progress=False)
        assert seen[-1] == want
        assert res.report["trigger_proxy"]["setting"] == dict(zip(("steps", "batch", "lr"), want))


def test_unlearning_and_purification_follow_the_effort_too():
    """Unlearning's most epochs (20 at full effort) and purification's epochs (10) shrink with the effort as the
    trigger phase does, at least 1 each; a baseline alone keeps both whole; values set by hand are kept."""
    from onp_fast.defenses import get
    from onp_fast.prepare import with_effort

    def epochs(cfg, *efforts):
        c = with_effort(cfg, efforts, DIGITS)
        return c.unlearn_epochs, c.purify_epochs

    assert epochs(RepairConfig(), get("onp", ONPConfig(iterations=1, samples=2)).effort()) == (1, 1)
    assert epochs(RepairConfig(), get("onp", ONPConfig(iterations=10, samples=16)).effort()) == (10, 5)
    assert epochs(RepairConfig(), get("onp", ONPConfig(iterations=2, samples=16)).effort()) == (2, 1)
    assert epochs(RepairConfig(), get("onp").effort()) == (20, 10)
    assert epochs(RepairConfig(), get("fp").effort()) == (20, 10)
    assert epochs(RepairConfig(unlearn_epochs=4, purify_epochs=3), 0.01) == (4, 3)
    assert epochs(RepairConfig(purify_epochs=0), 0.01) == (1, 0)
    assert epochs(RepairConfig(trigger_steps=5), 0.5) == (10, 5)  # trigger steps by hand: the epochs still follow


def test_the_repair_command_scales_the_trigger_phase_with_its_rl_effort(tiny_ckpt, tmp_path, monkeypatch):
    """`onp-fast repair --iterations 2 --samples 4` (8 of 320 masks) synthesises the proxies in 2 steps of 8
    images per class (50 x 12 x 8 / 320 = 15 per class); --trigger-steps sets the steps by hand (12 images),
    --trigger-batch and --trigger-lr the rest of the optimisation; a learning rate of 0 is a one-line error."""
    import onp_fast.prepare.context as context_mod

    seen = []
    real = context_mod.synthesize_proxies
    monkeypatch.setattr(context_mod, "synthesize_proxies", lambda *a, **k: seen.append((k["steps"], k["batch"]))
                        or real(*a, **k))
    for extra, want in (([], (2, 8)), (["--trigger-steps", "3"], (3, 12)),
                        (["--trigger-steps", "3", "--trigger-batch", "5", "--trigger-lr", "0.1"], (3, 5))):
        out = tmp_path / f"r{len(seen)}.pt"
        res = CliRunner().invoke(main, ["repair", str(tiny_ckpt), "--dataset", "digits", "--out", str(out),
                                        "--defense-size", "40", "--purify", "none", *FAST, *extra])
        assert res.exit_code == 0, res.output
        assert seen[-1] == want
        report = json.loads(out.with_suffix(".report.json").read_text())
        cfg = report["config"]
        assert (cfg["trigger_steps"], cfg["trigger_batch"]) == want
        assert cfg["trigger_lr"] == (0.1 if "--trigger-lr" in extra else 0.2)
        assert report["trigger_proxy"]["setting"] == {"steps": want[0], "batch": want[1], "lr": cfg["trigger_lr"]}
    bad = CliRunner().invoke(main, ["repair", str(tiny_ckpt), "--dataset", "digits", "--out",
                                    str(tmp_path / "bad.pt"), "--trigger-lr", "0", *FAST])
    one_line_error(bad, "trigger_lr must be a positive number")
    assert not (tmp_path / "bad.pt").exists()


def test_a_short_repair_command_unlearns_and_purifies_briefly(tiny_ckpt, tmp_path):
    """`onp-fast repair --iterations 2 --samples 4` (8 of 960 masks): unlearning may take 1 epoch (not 20) and
    purification runs 1 epoch (not 10), as its report says; --purify-epochs sets the epochs by hand."""
    for extra, want in (([], 1), (["--purify-epochs", "3"], 3)):
        out = tmp_path / f"r{want}.pt"
        res = CliRunner().invoke(main, ["repair", str(tiny_ckpt), "--dataset", "digits", "--out", str(out),
                                        "--defense-size", "40", "--purify", "sam", *FAST, *extra])
        assert res.exit_code == 0, res.output
        report = json.loads(out.with_suffix(".report.json").read_text())
        assert report["config"]["purify_epochs"] == report["purify"]["epochs"] == want
        assert len(report["purify"]["ca_val_per_epoch"]) == want
        assert report["config"]["unlearn_epochs"] == report["unlearn"]["max_epochs"] == 1
        assert report["unlearn"]["epochs"] <= 1


def test_the_repair_command_synthesises_purification_only_families(tiny_ckpt, tmp_path, monkeypatch):
    """--purify-families (default periodic,blend,warp): synthesised beside --trigger-families and unlearned, never the
    suspect (detect); `none` and `--purify none` leave them out; a bad name is one error line before any work."""
    import onp_fast.prepare.context as context_mod

    seen = []
    real = context_mod.synthesize_proxies
    monkeypatch.setattr(context_mod, "synthesize_proxies", lambda *a, **k: seen.append((k["families"], k["detect"]))
                        or real(*a, **k))
    cases = (([], ("patch", "additive", "periodic", "blend", "warp")),
             (["--purify-families", "none"], ("patch", "additive")),
             (["--purify-families", "blend", "--trigger-families", "patch"], ("patch", "blend")),
             (["--purify", "none"], ("patch", "additive")))
    for extra, want in cases:
        out = tmp_path / f"r{len(seen)}.pt"
        res = CliRunner().invoke(main, ["repair", str(tiny_ckpt), "--dataset", "digits", "--out", str(out),
                                        "--defense-size", "40", "--purify", "sam+proxy", "--purify-epochs", "1",
                                        *FAST, *extra])
        assert res.exit_code == 0, res.output
        families, detect = seen[-1]
        assert families == want and set(detect) <= {"patch", "additive"}
        report = json.loads(out.with_suffix(".report.json").read_text())
        assert list(report["trigger_proxy"]["anomaly_per_family"]) == list(want)
        assert report["trigger_proxy"]["family"] in detect
    bad = CliRunner().invoke(main, ["repair", str(tiny_ckpt), "--dataset", "digits", "--out", str(tmp_path / "b.pt"),
                                    "--purify-families", "blend,wave", *FAST])
    one_line_error(bad, "--purify-families", "wave")
    assert len(seen) == len(cases)


def test_cli_repair_reward_sequential_option(tiny_ckpt, tmp_path):
    res, report = _short_repair(tiny_ckpt, tmp_path, "--reward-sequential", "0.5")
    assert report["config"]["reward_sequential"] == 0.5
    rate = report["details"]["policy_reward"]
    assert rate["sequential"] == 0.5 and 0 <= rate["stopped"] <= rate["masks"] == 8
    assert f"first look 0.5 of the images, {rate['stopped']} masks stopped there" in res.output
    bad = CliRunner().invoke(main, ["repair", str(tiny_ckpt), "--dataset", "digits", "--out",
                                    str(tmp_path / "fixed.pt"), "--reward-sequential", "1", *FAST])
    assert bad.exit_code == 2 and "reward-sequential" in bad.output


def test_cli_repair_precision_option(tiny_ckpt, tmp_path):
    """--precision bfloat16 reaches the config and purification's report; float16 on a CPU and an unknown name
    are one-line errors before any work."""
    res, report = _short_repair(tiny_ckpt, tmp_path, "--precision", "bfloat16", "--purify", "sam+proxy",
                                "--purify-epochs", "1")
    assert report["config"]["precision"] == "bfloat16"
    assert report["details"]["policy_reward"]["precision"] == "bfloat16"
    assert "policy reward (engine, bfloat16): 8 masks, " in res.output
    assert report["purify"]["precision"] == "bfloat16"
    for value, needle in (("float16", "float16 precision needs a CUDA device"), ("fp8", "fp8")):
        bad = CliRunner().invoke(main, ["repair", str(tiny_ckpt), "--dataset", "digits", "--out",
                                        str(tmp_path / "bad.pt"), "--precision", value, *FAST])
        if value == "fp8":  # click's own choice check
            assert bad.exit_code == 2 and needle in bad.output
        else:
            one_line_error(bad, needle)
        assert not (tmp_path / "bad.pt").exists()
