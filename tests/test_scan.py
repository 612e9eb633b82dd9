"""`scan` and `onp-fast scan` on tiny PreActResNet-18s trained on 8x8 digits (10 classes): a BadNets model is
flagged towards its target and a clean one of the same kind is not; the CLI's exit codes, verdict, JSON and
picture; scan's verdict is the one repair's prepare() reaches with the same seed."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import one_line_error
from click.testing import CliRunner
from train_helpers import fit

from onp_fast import attacks, models
from onp_fast.cli import main
from onp_fast.data import channel_stats, load_dataset, normalize
from onp_fast.io import save_model
from onp_fast.prepare import RepairConfig, prepare, scan
from onp_fast.prepare.trigger import DEFAULT_FAMILIES, DEFAULT_PURIFY_FAMILIES, FAMILIES, trigger_setting
from onp_fast.repair.pipeline import _scan_parts, proxy_part
from onp_fast.repair.scan_plot import write_trigger_png

pytestmark = pytest.mark.usefixtures("one_thread")

TARGET, N_TRAIN, N_DEFENSE = 0, 600, 200
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _digits8() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits train/test splits area-downsampled to 8x8 (1 channel, 10 classes), pixels in [0, 1]."""
    d = load_dataset("digits")
    return F.interpolate(d.train_x, size=(8, 8), mode="area"), d.train_y, \
        F.interpolate(d.test_x, size=(8, 8), mode="area"), d.test_y


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two tiny PreActResNet-18s (width 0.125) trained alike on the first 600 train images: "backdoored" with 10%
    BadNets poison (target 0), "clean" without; each saved with its normalisation. The next 200 (clean, unseen)
    train images are the defense set, also written as an npz data set (its train split) for the CLI."""
    tx, ty, vx, vy = _digits8()
    mean, std = channel_stats(tx)
    attack = attacks.build("badnets", (1, 8, 8), seed=0)
    root = tmp_path_factory.mktemp("scan")
    out = {"root": root, "mean": mean, "std": std}
    for name in ("backdoored", "clean"):
        torch.manual_seed(0)
        x, y = tx[:N_TRAIN].clone(), ty[:N_TRAIN].clone()
        if name == "backdoored":
            p = torch.arange(0, N_TRAIN, 10)
            x[p], y[p] = attack.apply(x[p]), TARGET
        m = models.build("preactresnet18", num_classes=10, in_channels=1, width=0.125, input_size=8)
        fit(m, normalize(x, mean, std), y, epochs=6)
        with torch.no_grad():
            ca = float((m(normalize(vx, mean, std)).argmax(1) == vy).float().mean())
            asr = float((m(normalize(attack.apply(vx[vy != TARGET]), mean, std)).argmax(1) == TARGET).float().mean())
        assert ca > 0.85 and (asr > 0.85 if name == "backdoored" else asr < 0.1), (name, ca, asr)
        save_model(m, root / f"{name}.pt", mean=tuple(mean.tolist()), std=tuple(std.tolist()))
        out[name] = m
    cx, cy = tx[N_TRAIN:N_TRAIN + N_DEFENSE], ty[N_TRAIN:N_TRAIN + N_DEFENSE]
    np.savez(root / "data.npz", x=cx.numpy(), y=cy.numpy(), x_test=vx.numpy(), y_test=vy.numpy())
    out.update(x=normalize(cx, mean, std), y=cy, data=f"npz:{root / 'data.npz'}")
    return out


@pytest.fixture(scope="module")
def scanned(tiny):
    """scan() of both models on the defense set, default config (seed 0)."""
    return {name: scan(tiny[name], tiny["x"], tiny["y"], 10, RepairConfig(seed=0)) for name in ("backdoored", "clean")}


def _run(*args):
    return CliRunner().invoke(main, ["scan", *map(str, args)])


def test_scan_flags_the_backdoor_target_and_not_a_clean_model(scanned):
    bad, clean = scanned["backdoored"], scanned["clean"]
    assert bad["flagged"] and bad["target"] == TARGET and bad["anomaly_index"] >= bad["gate"] == 2.0
    assert bad["family"] in ("patch", "additive")
    fam = bad["families"][bad["family"]]
    assert fam["class"] == TARGET and fam["anomaly_index"] == bad["anomaly_index"]
    assert min(fam["norms"]) == fam["norms"][TARGET]  # the target needs the smallest trigger
    assert bad["per_class_anomaly"][TARGET] == max(bad["per_class_anomaly"]) == bad["anomaly_index"]
    assert not clean["flagged"] and clean["target"] is None and clean["family"] is None
    assert clean["suspect"]["anomaly_index"] < clean["gate"]
    assert max(clean["per_class_anomaly"]) < 2.0
    for r in (bad, clean):
        assert set(r["families"]) == {"patch", "additive"}
        assert all(len(f["norms"]) == len(f["z_scores"]) == 10 for f in r["families"].values())
        assert r["defense"]["n"] == N_DEFENSE and 0 < r["defense"]["n_opt"] < N_DEFENSE and r["seconds"] > 0


def test_scan_agrees_with_what_repair_prepares(tiny, scanned, tmp_path):
    """The proxy that steers repair (prepare's ctx.proxy / ctx.trigger, same seed) is the one scan reports, and
    repair's report (its trigger_proxy part) says the same and draws the same picture. Repair also synthesises
    the purification-only families (RepairConfig.purify_families) and lists them; scan does not make them, and
    its detection families are repair's, number for number."""
    ctx = prepare(tiny["backdoored"], tiny["x"], tiny["y"], 10, RepairConfig(seed=0), progress=False)
    r = scanned["backdoored"]
    assert ctx.trigger is not None and ctx.trigger is ctx.proxy
    assert (ctx.proxy.target, ctx.proxy.family) == (r["target"], r["family"])
    assert round(ctx.proxy.anomaly_index, 3) == r["anomaly_index"]
    synthesised = [f for f in FAMILIES if f in DEFAULT_FAMILIES + DEFAULT_PURIFY_FAMILIES]
    assert list(ctx.proxies.patterns) == synthesised and ctx.proxies.detecting() == list(r["families"])
    for f in r["families"]:
        assert [round(float(v), 4) for v in ctx.proxies.norms[f]] == r["families"][f]["norms"]
    # repair's report carries the same verdict, and what its OUT.trigger.png needs, as JSON
    part = json.loads(json.dumps(_scan_parts(ctx)))
    detect = {**part["scan"], "families": {f: part["scan"]["families"][f] for f in r["families"]}}
    assert {k: v for k, v in r.items() if k not in ("seed", "defense", "seconds", "setting")} == detect
    assert r["setting"] == proxy_part(ctx)["setting"] == dict(zip(("steps", "batch", "lr"),
                                                                   trigger_setting(tiny["x"].shape)))
    assert set(part["scan"]["families"]) - set(r["families"]) == {"periodic", "blend", "warp"}
    png = tmp_path / "m.trigger.png"
    assert write_trigger_png(png, {"trigger_proxy": part}, tiny["x"], tiny["y"], tiny["mean"], tiny["std"])
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 20_000
    assert not write_trigger_png(tmp_path / "none.png", {"trigger_proxy": None}, tiny["x"], tiny["y"], tiny["mean"],
                                 tiny["std"]) and not (tmp_path / "none.png").exists()


def test_cli_flags_the_backdoored_model_with_exit_3_json_and_picture(tiny, scanned, tmp_path):
    png = tmp_path / "scan.png"
    result = _run(tiny["root"] / "backdoored.pt", "--dataset", tiny["data"], "--json", "--image", png)
    assert result.exit_code == 3, result.output
    got = json.loads(result.output)
    lib = scanned["backdoored"]  # the CLI takes every defense image (200 < 500), in the same order
    for key in ("flagged", "target", "family", "anomaly_index", "suspect", "gate", "families", "per_class_anomaly"):
        assert got[key] == lib[key], key
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 20_000
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically

    again = _run(tiny["root"] / "backdoored.pt", "--dataset", tiny["data"], "--image", png)
    one_line_error(again, str(png), "exists: pass --force to replace it")
    assert png.read_bytes() == data


def test_cli_text_verdict_for_both_models(tiny, scanned):
    bad = _run(tiny["root"] / "backdoored.pt", "--dataset", tiny["data"], "--quiet")
    assert bad.exit_code == 3, bad.output
    a = scanned["backdoored"]["anomaly_index"]
    assert bad.output.strip().splitlines()[-1] == (f"backdoor suspected: class {TARGET} (family "
                                                   f"{scanned['backdoored']['family']}, anomaly index {a:.2f} "
                                                   f">= gate 2)")
    assert "patch family" in bad.output and "additive family" in bad.output
    clean = _run(tiny["root"] / "clean.pt", "--dataset", tiny["data"], "--quiet")
    assert clean.exit_code == 0, clean.output
    s = scanned["clean"]["suspect"]["anomaly_index"]
    assert clean.output.strip().splitlines()[-1] == f"no class stands out (largest anomaly index {s:.2f} < gate 2)"


def test_cli_scans_with_the_periodic_family_too(tiny):
    res = _run(tiny["root"] / "clean.pt", "--dataset", tiny["data"], "--json", "--trigger-families",
               "periodic,patch,additive", "--trigger-steps", "5")
    assert res.exit_code in (0, 3), res.output
    got = json.loads(res.output)
    assert list(got["families"]) == ["patch", "additive", "periodic"]
    assert len(got["families"]["periodic"]["z_scores"]) == 10


@pytest.mark.parametrize("case", ["missing-model", "bad-dataset", "image-is-model", "image-folder", "defense-size",
                                  "too-many", "unknown-option", "unknown-family"])
def test_cli_bad_inputs_fail_with_one_error_line(case, tiny, tmp_path):
    model = tiny["root"] / "backdoored.pt"
    args = {"missing-model": (tmp_path / "none.pt", "--dataset", tiny["data"]),
            "bad-dataset": (model, "--dataset", "nope"),
            "image-is-model": (model, "--dataset", tiny["data"], "--image", model, "--force"),
            "image-folder": (model, "--dataset", tiny["data"], "--image", tmp_path / "no" / "x.png"),
            "defense-size": (model, "--dataset", tiny["data"], "--defense-size", "0"),
            "too-many": (model, "--dataset", tiny["data"], "--defense-size", "100000"),
            "unknown-option": (model, "--dataset", tiny["data"], "--nope"),
            "unknown-family": (model, "--dataset", tiny["data"], "--trigger-families", "patch,wave")}[case]
    one_line_error(_run(*args))


def test_cli_scans_and_draws_the_warp_family(tiny, tmp_path):
    picture = tmp_path / "scan.png"
    res = _run(tiny["root"] / "clean.pt", "--dataset", tiny["data"], "--json", "--trigger-families", "warp,patch",
               "--trigger-steps", "5", "--image", picture)
    assert res.exit_code in (0, 3), res.output
    got = json.loads(res.output)
    assert list(got["families"]) == ["patch", "warp"] and len(got["families"]["warp"]["norms"]) == 10
    assert picture.read_bytes()[:4] == b"\x89PNG"
