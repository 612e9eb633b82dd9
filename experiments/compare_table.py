"""The defense comparison tables: `onp-fast compare` (ONP with and without purification, FP, ANP, RNP, CLP,
FT-SAM on the same defense data and seed)
on each backdoored model, then one summary table.

    python experiments/compare_table.py --dataset digits --attacks badnets,blended,wanet,sig
    python experiments/compare_table.py --dataset shapes --attacks badnets,blended

Backdoored models come from experiments/quality.py's cache (.onp_cache/quality/, trained there when missing);
each is written with its attack spec to --out and compared through the CLI, one JSON per attack.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_args import add_model_options  # noqa: E402
from quality import backdoored  # noqa: E402

from onp_fast.atomic import write_text  # noqa: E402
from onp_fast.attacks import params_by_attack  # noqa: E402
from onp_fast.data import load_dataset  # noqa: E402
from onp_fast.evaluate import SPEC_FORMAT, attack_spec_path  # noqa: E402
from onp_fast.io import save_model  # noqa: E402


def checkpoint_path(dataset: str, attack_name: str, args, out: Path) -> Path:
    params = params_by_attack(args.attack_param).get(attack_name)
    tag = "".join(f"-{k}{v}" for k, v in sorted((params or {}).items()))
    sub = f"-n{args.train_subset}" if args.train_subset else ""
    return out / f"{dataset.replace(':', '_')}{sub}-{attack_name}{tag}-{args.arch}-w{args.width}.pt"


def export(dataset, splits, attack_name, args, out: Path) -> Path:
    """The cached backdoored model as our checkpoint plus its attack spec (target 0) -> checkpoint path."""
    params = params_by_attack(args.attack_param).get(attack_name)
    model, attack = backdoored(dataset, splits, attack_name, args.arch, args.width, args.epochs, args.seed,
                               params, train_subset=args.train_subset)
    path = checkpoint_path(dataset, attack_name, args, out)
    meta = {"format": SPEC_FORMAT, "attack": attack.spec(), "target": 0, "poison_rate": 0.1, "seed": args.seed,
            "dataset": dataset, "training": {"arch": args.arch, "width": args.width, "epochs": args.epochs,
                                             "train_subset": args.train_subset,
                                             "source": "experiments/quality.py cache"}}
    save_model(model, path, mean=splits.mean, std=splits.std, attack=meta)
    write_text(attack_spec_path(path), json.dumps(meta, indent=2) + "\n")
    return path


def merged(paths: list[Path]) -> dict:
    """The compare JSON of the first path that exists, each later one's rows replacing the same methods' (or
    added); SystemExit when two runs saw different 'before' figures (not the same model and test set)."""
    found = [json.loads(p.with_suffix(".compare.json").read_text()) for p in paths
             if p.with_suffix(".compare.json").exists()]
    if not found:
        raise SystemExit(f"no compare JSON for {paths[0].name} in {', '.join(str(p.parent) for p in paths)}")
    result = found[0]
    for other in found[1:]:
        if other["before"] != result["before"]:
            raise SystemExit(f"{paths[0].name}: the runs saw different models before any defense")
        rows = {r["method"]: r for r in result["rows"]}
        rows.update({r["method"]: r for r in other["rows"]})
        result["rows"] = list(rows.values())
    return result


def print_markdown(summary: list[tuple[str, dict]]) -> None:
    """The same summary as a Markdown table (the README's comparison rows)."""
    print("| model (before CA / ASR) | method | CA | ASR | RA | DER | s | pruned | re-ASR | retune ASR | "
          "oracle depth: CA / ASR | own rule depth: CA / ASR |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, res in summary:
        b = res["before"]
        print(f"| {name} ({100 * b['ca']:.2f} / {100 * b['asr']:.2f}) | prepare {res['prepare_s']:.0f} s "
              f"| | | | | | | | | | |")
        for r in res["rows"]:
            o, w = r.get("oracle", {}), r.get("own_rule", {})
            cells = [f"{100 * r[k]:.2f}" for k in ("ca", "asr", "ra")] + [f"{r['der']:.3f}", f"{r['seconds']:.0f}",
                                                                          str(r["pruned"])]
            cells += [f"{100 * r[k]['asr']:.2f}" if k in r else "-" for k in ("reactivation", "retune")]
            cells.append("-" if o.get("depth") is None else f"{o['depth']}: {100 * o['ca']:.2f} / {100 * o['asr']:.2f}")
            cells.append("-" if "ca" not in w else f"{w['depth']}: {100 * w['ca']:.2f} / {100 * w['asr']:.2f}")
            print(f"| | {r['method']} | " + " | ".join(cells) + " |")


def print_summary(dataset: str, summary: list[tuple[str, dict]]) -> None:
    """One table over attacks from compare's JSON results."""
    print(f"\n{dataset}: CA / ASR / RA (%), DER, seconds (shared prepare apart), re-activation CA / ASR (%), "
          f"retuning-attack ASR (%); depth from held-out defense images; oracle: test-set depth")
    print(f"{'attack':<8} {'method':<9} {'CA':>6} {'ASR':>6} {'RA':>6} {'DER':>6} {'sec':>7} {'re-CA':>6} "
          f"{'re-ASR':>6} {'rt-ASR':>6} | oracle depth CA ASR | own rule depth CA ASR DER")
    nan = {"ca": float("nan"), "asr": float("nan")}
    for name, res in summary:
        b = res["before"]
        print(f"{name:<8} {'none':<9} {100 * b['ca']:6.2f} {100 * b['asr']:6.2f} {100 * b['ra']:6.2f} "
              f"{'':>6} {res['prepare_s']:7.1f} {'':>20} |  (shared prepare seconds)")
        for r in res["rows"]:
            o, re, rt = r.get("oracle", {}), r.get("reactivation", nan), r.get("retune", nan)
            orc = "-" if o.get("depth") is None else f"{o['depth']:5d} {100 * o['ca']:6.2f} {100 * o['asr']:6.2f}"
            w = r.get("own_rule", {})
            own = "-" if "ca" not in w else (f"{w['depth']:5d} {100 * w['ca']:6.2f} {100 * w['asr']:6.2f} "
                                             f"{w['der']:6.3f}")
            print(f"{'':<8} {r['method']:<9} {100 * r['ca']:6.2f} {100 * r['asr']:6.2f} {100 * r['ra']:6.2f} "
                  f"{r['der']:6.3f} {r['seconds']:7.1f} {100 * re['ca']:6.2f} {100 * re['asr']:6.2f} "
                  f"{100 * rt['asr']:6.2f} | {orc} | {own}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(ap)
    ap.add_argument("--methods", default="onp,onp/none,fp,anp,rnp,clp,ftsam")
    ap.add_argument("--train-subset", type=int, default=0, help="backdoored models trained on this many images")
    ap.add_argument("--defense-size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--param", action="append", default=[], help="passed on to compare (METHOD.FIELD=VALUE)")
    ap.add_argument("--attack-param", action="append", default=[], metavar="ATTACK.KEY=VALUE",
                    help="attack parameter of the cached model (as experiments/quality.py's), e.g. sig.delta=0.1")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each compare run")
    ap.add_argument("--no-oracle", action="store_true", help="compare without the oracle table (its test-set "
                    "depth scan is most of the time on Fashion-MNIST's 10,000 test images)")
    ap.add_argument("--out", default=".onp_cache/compare")
    ap.add_argument("--from-json", action="store_true", help="only print the summary of the JSONs already in --out")
    ap.add_argument("--markdown", action="store_true", help="also print the summary as a Markdown table")
    ap.add_argument("--also", action="append", default=[], metavar="DIR",
                    help="with --from-json: another --out of runs of some methods on the same models, seed and "
                         "defense set; its rows replace the same methods' rows (later DIRs win), after checking "
                         "that both runs saw the same model before any defense")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = load_dataset(args.dataset, seed=args.seed)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    summary = []
    for name in args.attacks.split(","):
        if args.from_json:
            summary.append((name, merged([d / checkpoint_path(args.dataset, name, args, out).name for d in
                                          [out, *map(Path, args.also)]])))
            continue
        ckpt = export(args.dataset, splits, name, args, out)
        js = ckpt.with_suffix(".compare.json")
        cmd = [sys.executable, "-m", "onp_fast.cli", "compare", str(ckpt), "--dataset", args.dataset,
               "--attack-spec", str(attack_spec_path(ckpt)), "--methods", args.methods, "--json", str(js),
               "--defense-size", str(args.defense_size), "--seed", str(args.seed)]
        for p in args.param:
            cmd += ["--param", p]
        if args.no_oracle:
            cmd.append("--no-oracle")
        print(f"== {args.dataset} {name}: {' '.join(cmd[2:])}", flush=True)
        t = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        print(f"   ({time.perf_counter() - t:.0f}s)", flush=True)
        summary.append((name, json.loads(js.read_text())))
    print_summary(args.dataset, summary)
    if args.markdown:
        print_markdown(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
