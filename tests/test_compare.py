"""`compare` and `onp-fast compare` on a tiny backdoored model: same seed same table, compare's numbers are
the entry point's, the oracle is apart and never worse at its own rule, and one-line CLI errors (exit 2)."""
import json

import numpy as np
import pytest
import torch
from cli_helpers import one_line_error
from click.testing import CliRunner
from train_helpers import block_pixels, fit

from onp_fast import attacks, models
from onp_fast.cli import main
from onp_fast.compare import compare, format_table
from onp_fast.data import normalize
from onp_fast.defenses import ANPConfig, FPConfig, FTSAMConfig, ONPConfig, RNPConfig
from onp_fast.evaluate import evaluate
from onp_fast.io import save_model
from onp_fast.repair import RepairConfig, RewardWeights, repair

NUM_CLASSES, MEAN, STD = 4, (0.4,), (0.25,)
FAST_CONFIGS = {"onp": ONPConfig(iterations=2, samples=4), "fp": FPConfig(finetune_epochs=1),
                "anp": ANPConfig(iterations=5, batch_size=32), "rnp": RNPConfig(recover_epochs=1),
                "ftsam": FTSAMConfig(epochs=2)}
FAST_PARAMS = ["--param", "repair.reward_batch=16",
               "--param", "fp.finetune_epochs=1", "--reactivation-epochs", "1", "--retune-epochs", "1", "--defense-size", "40", "--quiet"]


def _pixels(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return block_pixels(n, seed, step=3)


@pytest.fixture(scope="module")
def backdoored(tmp_path_factory):
    """A tiny PreActResNet-18 trained with 20% BadNets poison (2x2 trigger, target 0), saved with its spec and
    its data as an npz data set."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    attack = attacks.build("badnets", (1, 8, 8), seed=0, size=2)
    x, y = _pixels(240, seed=1)
    poison = torch.arange(0, 240, 5)
    x[poison], y[poison] = attack.apply(x[poison]), 0
    m = models.build("preactresnet18", num_classes=NUM_CLASSES, in_channels=1, width=0.125, input_size=8)
    fit(m, normalize(x, MEAN, STD), y, epochs=8)
    test_x, test_y = _pixels(80, seed=2)
    r = evaluate(m, test_x, test_y, MEAN, STD, attack=attack, target=0)
    assert r["ca"] > 0.9 and r["asr"] > 0.9, r
    root = tmp_path_factory.mktemp("compare")
    clean_x, clean_y = _pixels(120, seed=3)
    np.savez(root / "data.npz", x=clean_x.numpy(), y=clean_y.numpy(), x_test=test_x.numpy(), y_test=test_y.numpy())
    save_model(m, root / "m.pt", mean=MEAN, std=STD)
    (root / "m.attack.json").write_text(json.dumps({"attack": attack.spec(), "target": 0}))
    (root / "notarget.json").write_text(json.dumps({"attack": attack.spec()}))
    yield {"model": m, "attack": attack, "clean": (clean_x, clean_y), "test": (test_x, test_y), "root": root}
    torch.set_num_threads(before)


def _cfg() -> RepairConfig:
    return RepairConfig(reward_batch=32, perturbations=1, seed=3)


def _compare(b, **kw):
    x, y = b["clean"]
    return compare(b["model"], normalize(x[:48], MEAN, STD), y[:48], NUM_CLASSES, test_x=b["test"][0],
                   test_y=b["test"][1], mean=MEAN, std=STD, attack=b["attack"], target=0, cfg=_cfg(),
                   configs=FAST_CONFIGS, reactivation_epochs=1, retune_epochs=1, **kw)


def _without_times(result: dict) -> dict:
    """The result without what is measured rather than computed: seconds and the process's peak memory."""
    out = json.loads(json.dumps(result))
    for key in ("prepare_s", "prepare_times_s", "peak_memory"):
        out.pop(key)
    for row in out["rows"]:
        row.pop("seconds")
        row.pop("times_s")
        row.pop("seconds_per_iteration", None)
        for key in ("seconds", "masks_per_s", "images_per_s"):  # the policy phase's throughput is timing too
            row.get("policy_reward", {}).pop(key, None)
    return out


def test_same_seed_same_table_and_its_numbers_are_the_entry_points(backdoored):
    a = _compare(backdoored)
    b = _compare(backdoored)
    assert [r["method"] for r in a["rows"]] == ["onp", "onp/none", "fp", "anp", "rnp", "clp", "ftsam"]
    assert _without_times(a) == _without_times(b)
    assert a["before"]["asr"] > 0.9
    for r in a["rows"]:
        assert 0 <= r["ca"] <= 1 and 0 <= r["asr"] <= 1 and 0 <= r["ra"] <= 1 and 0 <= r["der"] <= 1
        assert r["seconds"] > 0 and r["reactivation"]["epochs"] == 1 and r["retune"]["epochs"] == 1
        assert 0 <= r["retune"]["asr"] <= 1
        assert (r["oracle"]["depth"] is not None) == (r["candidates"] > 0)  # FT-SAM prunes nothing
    text = format_table(a)
    assert "oracle (test-set depth" in text and "held-out" in text
    part = a["trigger_proxy"]
    assert part["family"] in ("patch", "additive") and set(part["anomaly_per_family"]) >= {"patch", "additive"}
    assert (f"trigger proxy: {part['family']}/{part['target']} at anomaly index {part['anomaly_index']:.2f}, "
            f"{'flagged' if part['flagged'] else 'not flagged'}") in text
    assert all(f"\n{m:<9}|" in text for m in ("onp", "onp/none", "fp", "anp", "rnp", "clp"))
    rows = {r["method"]: r for r in a["rows"]}
    assert rows["onp"]["purify"]["mode"] == "sam+proxy" and rows["onp/none"]["purify"] == {"mode": "none"}
    assert all(rows[m]["purify"] == {"mode": "none"} for m in ("fp", "anp", "rnp", "clp", "ftsam"))
    assert rows["onp/none"]["pruned"] == rows["onp"]["pruned"]  # the same ranking and depth, not purified
    # A method's row is exactly what the single entry point gives on the same data and seed: the oracle and the
    # methods run before it do not leak into it.
    x, y = backdoored["clean"]
    for name in ("onp", "anp", "clp"):
        res = repair(backdoored["model"], normalize(x[:48], MEAN, STD), y[:48], NUM_CLASSES, name, _cfg(),
                     FAST_CONFIGS.get(name), progress=False)
        row = next(r for r in a["rows"] if r["method"] == name)
        assert row["pruned"] == int(res.prune.sum())
        # the shared scan's suspect, reported once, is the one every repair on the same data reports
        assert a["trigger_proxy"] == {k: v for k, v in res.report["trigger_proxy"].items()
                                      if k not in ("scan", "picture")}
        ev = evaluate(res.model, *backdoored["test"], MEAN, STD, attack=backdoored["attack"], target=0)
        assert (row["ca"], row["asr"], row["ra"]) == (ev["ca"], ev["asr"], ev["ra"])


def test_a_method_with_another_purification_is_scored_once(backdoored, monkeypatch):
    from onp_fast.defenses.onp import ONP

    calls = []
    real = ONP.scores
    monkeypatch.setattr(ONP, "scores", lambda self, ctx: calls.append(1) or real(self, ctx))
    res = _compare(backdoored, methods=["onp/none", "onp/sam"])
    assert len(calls) == 1
    a, b = res["rows"]
    assert (a["method"], b["method"]) == ("onp/none", "onp/sam") and b["purify"]["mode"] == "sam"
    assert a["pruned"] == b["pruned"] and b["seconds"] > 0 and "policy" in b["times_s"]


def test_the_oracle_is_scanned_once_per_ranking_and_can_be_left_out(backdoored, monkeypatch):
    import onp_fast.compare as cmp

    calls = []
    real = cmp.oracle
    monkeypatch.setattr(cmp, "oracle", lambda *a, **k: calls.append(1) or real(*a, **k))
    methods = ["onp/none", "onp/sam", "clp"]
    res = _compare(backdoored, methods=methods)
    assert len(calls) == 2  # ONP's ranking once (the oracle never purifies), CLP's once
    none, sam, _ = res["rows"]
    assert none["oracle"] == sam["oracle"] and none["oracle"]["depth"] is not None
    calls.clear()
    off = _compare(backdoored, methods=methods, oracle_table=False)
    assert calls == [] and off["oracle_rule"] is None and all("oracle" not in r for r in off["rows"])
    timing = ("oracle", "seconds", "times_s", "policy_reward")
    assert [{k: v for k, v in r.items() if k not in timing} for r in off["rows"]] == \
        [{k: v for k, v in r.items() if k not in timing} for r in res["rows"]]  # the oracle leaks into no row
    text = format_table(off)
    assert "oracle: not computed" in text and "oracle (test-set" not in text


def test_the_oracle_is_never_worse_at_its_own_rule(backdoored):
    res = _compare(backdoored, methods=["rnp", "clp"], oracle_tolerance=0.05)
    before = res["before"]
    assert "CA before - 0.05" in res["oracle_rule"]
    for r in res["rows"]:
        o = r["oracle"]
        assert o["ca"] >= before["ca"] - 0.05 - 1e-9
        if r["ca"] >= before["ca"] - 0.05:  # the held-out depth was one of the oracle's candidates
            assert o["asr"] <= r["asr"]


def test_each_method_is_also_evaluated_at_its_own_published_rule(backdoored):
    from onp_fast.defenses.clp import CLPConfig

    res = _compare(backdoored, methods=["clp", "anp", "ftsam"], oracle_tolerance=0.05)
    rows = {r["method"]: r for r in res["rows"]}
    assert "own_rule" not in rows["ftsam"]  # FT-SAM prunes nothing: no published pruning rule
    x, y = backdoored["clean"]
    for name in ("clp", "anp"):
        own = rows[name]["own_rule"]
        rep = repair(backdoored["model"], normalize(x[:48], MEAN, STD), y[:48], NUM_CLASSES, name, _cfg(),
                     FAST_CONFIGS.get(name), progress=False)
        # the published test, applied to the method's own scores: CLP's UCLC > u, ANP's lowest mask <= 0.2
        hit = rep.scores > CLPConfig().u if name == "clp" else rep.scores >= 1 - ANPConfig().threshold - 1e-7
        assert own["groups"] == own["depth"] == int(hit.sum())
        ev = evaluate(rep.groups.pruned_copy(backdoored["model"], hit), *backdoored["test"], MEAN, STD,
                      attack=backdoored["attack"], target=0)
        assert (own["ca"], own["asr"], own["ra"]) == (ev["ca"], ev["asr"], ev["ra"])
    assert rows["anp"]["seconds_per_iteration"] > 0
    assert rows["clp"]["own_rule"]["groups"] > 0  # the planted trigger gives CLP channels over its bound
    text = format_table(res)
    assert "own rule (the method's published pruning rule" in text and "UCLC > mean" in text


def _run(args):
    return CliRunner().invoke(main, args)


def test_cli_compare_prints_the_table_and_writes_json(backdoored, tmp_path):
    root = backdoored["root"]
    out = tmp_path / "cmp.json"
    res = _run(["compare", str(root / "m.pt"), "--dataset", f"npz:{root / 'data.npz'}", "--attack-spec",
                str(root / "m.attack.json"), "--methods", "clp,FP,clp", "--json", str(out), "--reward-backend", "hooks",
                *FAST_PARAMS])
    assert res.exit_code == 0, res.output
    assert "oracle" in res.output and "\nclp      |" in res.output and "\nfp       |" in res.output
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["rows"]] == ["clp", "fp"]
    assert data["attack"] == "badnets" and data["target"] == 0 and data["defense"]["n"] == 40
    assert data["rows"][1]["config"]["finetune_epochs"] == 1
    assert data["reward_backend"] == "hooks"  # --reward-backend reaches the shared config
    assert data["trigger_proxy"]["family"] in ("patch", "additive") and "trigger proxy: " in res.output
    res = _run(["compare", str(root / "m.pt"), "--dataset", f"npz:{root / 'data.npz'}", "--attack-spec",
                str(root / "m.attack.json"), "--methods", "clp,fp", "--no-oracle", *FAST_PARAMS])
    assert res.exit_code == 0, res.output
    assert "oracle: not computed" in res.output and "\nclp      |" in res.output


@pytest.mark.parametrize("case", ["unknown_method", "bad_purification", "empty_methods", "missing_spec", "no_target", "bad_param",
                                  "param_for_other_method", "json_folder", "defense_size", "missing_model"])
def test_cli_compare_bad_inputs(case, backdoored, tmp_path):
    root = backdoored["root"]
    args = {"model": str(root / "m.pt"), "spec": str(root / "m.attack.json"), "methods": "onp,clp", "extra": []}
    needles = {
        "unknown_method": ("unknown method 'nap'", "onp, fp, anp, rnp, clp"),
        "bad_purification": ("unknown purification in 'onp/bogus'", "sam+proxy"),
        "empty_methods": ("--methods is empty",),
        "missing_spec": ("attack spec file not found",),
        "no_target": ("no target class",),
        "bad_param": ("anp.iterations", "METHOD.FIELD=VALUE"),
        "param_for_other_method": ("anp is not among the methods",),
        "json_folder": ("--json folder does not exist",),
        "defense_size": ("--defense-size",),
        "missing_model": ("not found",),
    }[case]
    if case == "unknown_method":
        args["methods"] = "onp,nap"
    elif case == "bad_purification":
        args["methods"] = "onp/bogus"
    elif case == "empty_methods":
        args["methods"] = " , "
    elif case == "missing_spec":
        args["spec"] = str(tmp_path / "nope.attack.json")
    elif case == "no_target":
        args["spec"] = str(root / "notarget.json")
    elif case == "bad_param":
        args["extra"] = ["--param", "anp.iterations"]
    elif case == "param_for_other_method":
        args["extra"] = ["--param", "anp.iterations=3"]
    elif case == "json_folder":
        args["extra"] = ["--json", str(tmp_path / "no" / "dir" / "x.json")]
    elif case == "defense_size":
        args["extra"] = ["--defense-size", "0"]
    elif case == "missing_model":
        args["model"] = str(tmp_path / "absent.pt")
    res = _run(["compare", args["model"], "--dataset", f"npz:{root / 'data.npz'}", "--attack-spec", args["spec"],
                "--methods", args["methods"], "--quiet", *args["extra"]])
    one_line_error(res, *needles)
    assert "Traceback" not in res.output


def test_compare_shares_one_rule_and_can_skip_the_reactivation_check(backdoored):
    """RepairConfig is the shared context's: its tolerance is every method's depth rule."""
    x, y = backdoored["clean"]
    cfg = RepairConfig(reward_batch=16, seed=0, tolerance=0.0,
                       weights=RewardWeights(ca_t=0.0))
    res = compare(backdoored["model"], normalize(x[:40], MEAN, STD), y[:40], NUM_CLASSES,
                  test_x=backdoored["test"][0], test_y=backdoored["test"][1], mean=MEAN, std=STD,
                  attack=backdoored["attack"], target=0, cfg=cfg, methods=["clp", "fp"],
                  configs={"fp": FPConfig(finetune_epochs=0)}, reactivation_epochs=0)
    assert res["defense"] == {"n": 40, "n_opt": 32, "n_val": 8, "seed": 0}
    for r in res["rows"]:
        assert r["depth_rule"].endswith("- 0.0") and "reactivation" not in r
        assert r["ca_val"][1] >= r["ca_val"][0]  # tolerance 0: no CA loss on D_val


def test_cli_compare_refuses_a_bad_method_mode_before_reading_anything(backdoored, tmp_path):
    """A mode outside a method's choices (`--param rnp.stop_check=hourly`) is the only line printed: no model
    or data was read (the defense-accuracy line comes after those), exit code 2."""
    root = backdoored["root"]
    res = _run(["compare", str(root / "m.pt"), "--dataset", f"npz:{root / 'data.npz'}", "--attack-spec",
                str(root / "m.attack.json"), "--methods", "onp,rnp", "--param", "rnp.stop_check=hourly"])
    one_line_error(res, "rnp.stop_check must be one of epoch, step, not 'hourly'")
