"""The bad-input table: every command fed bad or unusual inputs, each case in a fresh folder, as a user would.
A case passes when the command exits 2, prints exactly one non-blank line and it starts with `error: `, shows no
traceback, and leaves the folder as it found it (no new, changed or removed file).

    python experiments/bad_inputs.py [--only SUBSTRING] [--json FILE]

Prints one line per case and the counts. Slow (one process per case, about 2-4 s each): not part of the tests.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from onp_fast import attacks, models
from onp_fast.evaluate import SPEC_FORMAT
from onp_fast.io import save_model


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def make_inputs(folder: Path) -> None:
    """The files the cases read, written into `folder`."""
    torch.manual_seed(0)
    good = models.build("preactresnet18", num_classes=10, in_channels=1, width=0.125, input_size=16)
    save_model(good, folder / "good.pt")
    torch.save(good.state_dict(), folder / "sd.pt")
    save_model(models.build("preactresnet18", num_classes=10, in_channels=3, width=0.125, input_size=16),
               folder / "rgb.pt")
    save_model(models.build("preactresnet18", num_classes=5, in_channels=1, width=0.125, input_size=16),
               folder / "cls5.pt")
    nan = models.build("preactresnet18", num_classes=10, in_channels=1, width=0.125, input_size=16)
    with torch.no_grad():
        next(nan.parameters()).fill_(float("nan"))
    save_model(nan, folder / "nan.pt")
    data = (folder / "good.pt").read_bytes()
    (folder / "trunc.pt").write_bytes(data[: len(data) // 2])
    (folder / "empty.pt").write_bytes(b"")
    (folder / "text.pt").write_text("hello\n")
    torch.save({"state_dict": _Evil()}, folder / "evil.pt")
    with open(folder / "plain.pkl", "wb") as f:
        pickle.dump(good.state_dict(), f)
    (folder / "adir").mkdir()
    spec = {"format": SPEC_FORMAT, "attack": attacks.build("badnets", (1, 16, 16), seed=0).spec(), "target": 0}
    (folder / "spec.json").write_text(json.dumps(spec))
    rgb = dict(spec, attack=attacks.build("badnets", (3, 32, 32), seed=0).spec())
    (folder / "spec_rgb.json").write_text(json.dumps(rgb))
    (folder / "spec_bad.json").write_text("{not json")
    (folder / "spec_notarget.json").write_text(json.dumps({k: v for k, v in spec.items() if k != "target"}))
    x = np.random.default_rng(0).random((60, 1, 16, 16), dtype=np.float32)
    y = np.arange(60) % 10
    (folder / "text.npz").write_text("hello\n")
    np.savez(folder / "empty.npz", x=x[:0], y=y[:0])
    np.savez(folder / "labels.npz", x=x, y=y + 5, num_classes=10)
    np.savez(folder / "rgb.npz", x=np.repeat(x, 3, axis=1), y=y)
    xn = x.copy()
    xn[0, 0, 0, 0] = np.nan
    np.savez(folder / "nanpix.npz", x=xn, y=y)
    np.savez(folder / "noy.npz", x=x)
    np.savez(folder / "ok.npz", x=x, y=y, num_classes=10)
    (folder / "exists.pt").write_bytes(b"keep")
    (folder / "idx").mkdir()
    (folder / "idx" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03\x00\x00")


def cases() -> list[tuple[str, list[str]]]:
    """(name, argv after `onp-fast`) per case; the files are those of make_inputs, in the current folder."""
    info = [("info: " + n, ["info", *a]) for n, a in [
        ("missing file", ["missing.pt"]), ("empty file", ["empty.pt"]), ("truncated", ["trunc.pt"]),
        ("text file", ["text.pt"]), ("code-running pickle", ["evil.pt"]),
        ("code-running pickle with --arch", ["evil.pt", "--arch", "preactresnet18"]),
        ("plain pickle", ["plain.pkl", "--arch", "preactresnet18"]), ("folder", ["adir"]),
        ("weights without --arch", ["sd.pt"]), ("unknown arch", ["sd.pt", "--arch", "resnet9000"]),
        ("wrong arch", ["sd.pt", "--arch", "vgg16_bn"]), ("NaN weights", ["nan.pt"]),
        ("unknown data", ["good.pt", "--data", "imagenet42"]), ("wrong channels", ["rgb.pt", "--data", "digits"]),
        ("wrong classes", ["cls5.pt", "--data", "digits"]), ("--mean without --std", ["good.pt", "--mean", "0"]),
        ("--std 0", ["good.pt", "--mean", "0", "--std", "0"]), ("--input-size 0", ["good.pt", "--input-size", "0"]),
        ("--threads 0", ["good.pt", "--threads", "0"]), ("no model", []),
    ]]
    ev = [("evaluate: " + n, ["evaluate", *a]) for n, a in [
        ("missing model", ["missing.pt", "--dataset", "digits"]), ("no --dataset", ["good.pt"]),
        ("unknown dataset", ["good.pt", "--dataset", "mnist2"]),
        ("npz missing", ["good.pt", "--dataset", "npz:none.npz"]), ("npz text", ["good.pt", "--dataset", "npz:text.npz"]),
        ("npz empty", ["good.pt", "--dataset", "npz:empty.npz"]),
        ("labels out of range", ["good.pt", "--dataset", "npz:labels.npz"]),
        ("npz wrong channels", ["good.pt", "--dataset", "npz:rgb.npz"]),
        ("npz NaN pixels", ["good.pt", "--dataset", "npz:nanpix.npz"]), ("npz without y", ["good.pt", "--dataset", "npz:noy.npz"]),
        ("IDX truncated", ["good.pt", "--dataset", "fashion-mnist:idx"]),
        ("IDX folder missing", ["good.pt", "--dataset", "fashion-mnist:nowhere"]),
        ("5-class model", ["cls5.pt", "--dataset", "digits"]), ("RGB model", ["rgb.pt", "--dataset", "digits"]),
        ("spec missing", ["good.pt", "--dataset", "digits", "--attack-spec", "none.json"]),
        ("spec not JSON", ["good.pt", "--dataset", "digits", "--attack-spec", "spec_bad.json"]),
        ("spec image shape", ["good.pt", "--dataset", "digits", "--attack-spec", "spec_rgb.json"]),
        ("spec without target", ["good.pt", "--dataset", "digits", "--attack-spec", "spec_notarget.json"]),
        ("--target 99", ["good.pt", "--dataset", "digits", "--attack-spec", "spec.json", "--target", "99"]),
        ("--batch-size 0", ["good.pt", "--dataset", "digits", "--batch-size", "0"]),
        ("--seed abc", ["good.pt", "--dataset", "digits", "--seed", "abc"]),
        ("--seed -1", ["good.pt", "--dataset", "digits", "--seed", "-1"]),
        ("--mean text", ["good.pt", "--dataset", "digits", "--mean", "x", "--std", "1"]),
        ("--mean 2 values for 1 channel", ["good.pt", "--dataset", "digits", "--mean", "0,0", "--std", "1,1"]),
        ("--input-size differs from data", ["good.pt", "--dataset", "digits", "--input-size", "32"]),
        ("NaN weights", ["nan.pt", "--dataset", "digits"]),
    ]]
    at = [("attack: " + n, ["attack", "--dataset", "digits", "--arch", "preactresnet18", "--out", "new.pt", *a])
          for n, a in [
        ("unknown attack", ["--attack", "magic"]), ("unknown arch", ["--attack", "badnets", "--arch", "nope"]),
        ("--epochs 0", ["--attack", "badnets", "--epochs", "0"]),
        ("--poison-rate 0", ["--attack", "badnets", "--poison-rate", "0"]),
        ("--poison-rate 2", ["--attack", "badnets", "--poison-rate", "2"]),
        ("--target 10", ["--attack", "badnets", "--target", "10"]), ("--width 0", ["--attack", "badnets", "--width", "0"]),
        ("--out missing folder", ["--attack", "badnets", "--out", "nowhere/m.pt"]),
        ("--out folder", ["--attack", "badnets", "--out", "adir"]),
        ("--out exists", ["--attack", "badnets", "--out", "exists.pt"]),
        ("--param not KEY=VALUE", ["--attack", "blended", "--param", "alpha"]),
        ("--param unknown key", ["--attack", "blended", "--param", "beta=1"]),
        ("--lr 0", ["--attack", "badnets", "--lr", "0"]), ("--batch-size 0", ["--attack", "badnets", "--batch-size", "0"]),
        ("unknown dataset", ["--attack", "badnets", "--dataset", "nope"]),
        ("--threads 0", ["--attack", "badnets", "--threads", "0"]),
    ]]
    rp = [("repair: " + n, ["repair", *a]) for n, a in [
        ("--out is the model", ["good.pt", "--dataset", "digits", "--out", "good.pt"]),
        ("--masks is --out", ["good.pt", "--dataset", "digits", "--out", "o.pt", "--masks", "o.pt"]),
        ("--report is --plot", ["good.pt", "--dataset", "digits", "--out", "o.pt", "--report", "r.x", "--plot", "r.x"]),
        ("--out is the data", ["good.pt", "--dataset", "npz:ok.npz", "--out", "ok.npz"]),
        ("--out exists", ["good.pt", "--dataset", "digits", "--out", "exists.pt"]),
        ("--out missing folder", ["good.pt", "--dataset", "digits", "--out", "nowhere/o.pt"]),
        ("--out folder", ["good.pt", "--dataset", "digits", "--out", "adir"]),
        ("--defense-size 0", ["good.pt", "--dataset", "digits", "--defense-size", "0"]),
        ("--defense-size too large", ["good.pt", "--dataset", "digits", "--defense-size", "99999"]),
        ("--defense-size 5", ["good.pt", "--dataset", "digits", "--defense-size", "5", "--skip-accuracy-check"]),
        ("--tolerance -1", ["good.pt", "--dataset", "digits", "--tolerance", "-1"]),
        ("--tolerance 5", ["good.pt", "--dataset", "digits", "--tolerance", "5"]),
        ("--tolerance inf", ["good.pt", "--dataset", "digits", "--tolerance", "inf"]),
        ("--tolerance nan", ["good.pt", "--dataset", "digits", "--tolerance", "nan"]),
        ("tolerance too fine for the defense set",
         ["good.pt", "--dataset", "digits", "--defense-size", "100", "--tolerance", "0.01", "--skip-accuracy-check"]),
        ("reward weight inf", ["good.pt", "--dataset", "digits", "--reward-weights", "ca_b=inf"]),
        ("reward weight negative", ["good.pt", "--dataset", "digits", "--reward-weights", "sparsity=-1"]),
        ("reward weight unknown", ["good.pt", "--dataset", "digits", "--reward-weights", "foo=1"]),
        ("reward weight not a number", ["good.pt", "--dataset", "digits", "--reward-weights", "ca_b=x"]),
        ("--finetune-epochs -1", ["good.pt", "--dataset", "digits", "--finetune-epochs", "-1"]),
        ("--purify unknown", ["good.pt", "--dataset", "digits", "--purify", "all"]),
        ("--purify-lr 0", ["good.pt", "--dataset", "digits", "--purify-lr", "0"]),
        ("--purify-lr nan", ["good.pt", "--dataset", "digits", "--purify-lr", "nan"]),
        ("--purify-clip -1", ["good.pt", "--dataset", "digits", "--purify-clip", "-1"]),
        ("--purify-epochs -1", ["good.pt", "--dataset", "digits", "--purify-epochs", "-1"]),
        ("--method unknown", ["good.pt", "--dataset", "digits", "--method", "magic"]),
        ("--iterations 0", ["good.pt", "--dataset", "digits", "--iterations", "0"]),
        ("--samples 1", ["good.pt", "--dataset", "digits", "--samples", "1"]),
        ("ONP option with a baseline", ["good.pt", "--dataset", "digits", "--method", "clp", "--iterations", "3"]),
        ("--threads 0", ["good.pt", "--dataset", "digits", "--threads", "0"]),
        ("--reward-backend unknown", ["good.pt", "--dataset", "digits", "--reward-backend", "fast"]),
        ("model near chance (untrained)", ["good.pt", "--dataset", "digits"]),
        ("NaN weights", ["nan.pt", "--dataset", "digits"]), ("truncated model", ["trunc.pt", "--dataset", "digits"]),
        ("RGB model on digits", ["rgb.pt", "--dataset", "digits"]),
        ("code-running pickle", ["evil.pt", "--dataset", "digits", "--arch", "preactresnet18"]),
        ("labels out of range", ["good.pt", "--dataset", "npz:labels.npz"]),
        ("MODEL is a folder", ["adir", "--dataset", "digits"]),
    ]]
    cp = [("compare: " + n, ["compare", "good.pt", "--dataset", "digits", *a]) for n, a in [
        ("no --attack-spec", []), ("spec missing", ["--attack-spec", "none.json"]),
        ("--json is the model", ["--attack-spec", "spec.json", "--json", "good.pt"]),
        ("--json is the spec", ["--attack-spec", "spec.json", "--json", "spec.json"]),
        ("--json exists", ["--attack-spec", "spec.json", "--json", "exists.pt"]),
        ("--methods empty", ["--attack-spec", "spec.json", "--methods", ","]),
        ("--methods unknown", ["--attack-spec", "spec.json", "--methods", "magic"]),
        ("--param not FIELD=VALUE", ["--attack-spec", "spec.json", "--param", "anp.iterations"]),
        ("--param unknown field", ["--attack-spec", "spec.json", "--param", "anp.nope=1"]),
        ("--reactivation-epochs -1", ["--attack-spec", "spec.json", "--reactivation-epochs", "-1"]),
        ("--defense-size 0", ["--attack-spec", "spec.json", "--defense-size", "0"]),
        ("spec image shape", ["--attack-spec", "spec_rgb.json"]),
        ("model near chance", ["--attack-spec", "spec.json"]),
    ]]
    sc = [("scan: " + n, ["scan", *a]) for n, a in [
        ("missing model", ["missing.pt", "--dataset", "digits"]), ("no --dataset", ["good.pt"]),
        ("--image is the model", ["good.pt", "--dataset", "digits", "--image", "good.pt"]),
        ("--image exists", ["good.pt", "--dataset", "digits", "--image", "exists.pt"]),
        ("--defense-size 0", ["good.pt", "--dataset", "digits", "--defense-size", "0"]),
        ("RGB model", ["rgb.pt", "--dataset", "digits"]),
    ]]
    other = [("demo: --epochs 0", ["demo", "--epochs", "0", "--cache-dir", "cache"]),
             ("demo: --cache-dir is a file", ["demo", "--cache-dir", "exists.pt"]),
             ("bench: --only unknown", ["bench", "--only", "nope"]),
             ("bench: --threads 0", ["bench", "--threads", "0"]),
             ("unknown command", ["frobnicate"])]
    return info + ev + at + rp + cp + sc + other


def _snapshot(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def run_case(base: Path, argv: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "w"
        shutil.copytree(base, work)
        before = _snapshot(work)
        proc = subprocess.run([sys.executable, "-m", "onp_fast.cli", *argv], cwd=work, capture_output=True,
                              text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
        after = _snapshot(work)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    ok = (proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
          and "Traceback" not in proc.stderr and not changed)
    return {"ok": ok, "rc": proc.returncode, "lines": len(lines), "first": lines[0] if lines else "",
            "changed": changed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "inputs"
        base.mkdir()
        make_inputs(base)
        for name, argv in cases():
            if args.only and args.only not in name:
                continue
            r = run_case(base, argv)
            results.append({"case": name, "argv": argv, **r})
            flag = "ok  " if r["ok"] else "FAIL"
            detail = r["first"][:150] if r["ok"] else f"rc={r['rc']} lines={r['lines']} changed={r['changed']} " \
                                                      f"{r['first'][:120]}"
            print(f"{flag} {name:<48} {detail}", flush=True)
    good = sum(r["ok"] for r in results)
    print(f"{good} of {len(results)} cases: one `error:` line, exit 2, nothing left behind")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
