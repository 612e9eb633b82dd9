"""Run the official ANP and RNP code on one of our cached backdoored models and compare with onp_fast's ANP / RNP.

    python experiments/official_check.py --anp-code /tmp/anp_official --rnp-code /tmp/rnp_official \\
        [--dataset digits --attack badnets --anp-iterations 2000 --rnp-recover-epochs 20 --noise-floor ANP,RNP]
        [--json out.json]

A checkout of the official code is made from a bare git dir with e.g.
    git --git-dir=/work/.mirror/csdongxian+ANP_backdoor/repo archive HEAD | tar -x -C /tmp/anp_official
    git --git-dir=/work/.mirror/bboylyg+RNP/repo archive HEAD | tar -x -C /tmp/rnp_official
Not part of CI (it needs those checkouts and takes minutes).

What runs, on the same model (the cached one of experiments/quality.py, BadNets etc. target 0) and the same
defense images (defense_subset(splits, --defense-size, seed), normalised, no augmentation on either side):
  official ANP  a deep copy of our model with every nn.BatchNorm2d swapped for the official NoisyBatchNorm2d
                (models/anp_batchnorm.py, loaded from the checkout unchanged; same weights and running statistics),
                the official optimisers (SGD lr 0.2 momentum 0.9 on neuron_mask; SGD lr eps/steps on neuron_noise*)
                and the official `mask_train` (with `clip_mask`, `sign_grad`, `include_noise`, `exclude_noise`,
                `reset`) from optimize_mask_cifar.py, over a DataLoader with RandomSampler(replacement=True,
                num_samples=print_every * batch_size), called ceil(iterations / print_every) times
                (print_every = min(500, iterations)), as the official main().
  ours ANP      onp_fast.defenses.anp.anp_masks(model, x, y, ANPConfig(iterations=...), seed).
  official RNP  `train_step_unlearning` on a deep copy of our model (plain BatchNorm, as the official builds it with
                norm_layer=None; SGD lr 0.01 momentum 0.9 wd 5e-4, MultiStepLR [10, 20]) for epochs 0..20, stopping
                when the epoch's accuracy <= 0.2; then the unlearned copy's BatchNorm2d swapped for the official
                MaskBatchNorm2d (models/mask_batchnorm.py) and `train_step_recovering` (with `clip_mask`) from main.py
                for the recovery epochs (SGD lr 0.2 momentum 0.9 on neuron_mask); one DataLoader(shuffle=True,
                batch_size=128) for both, as the official.
  ours RNP      onp_fast.defenses.rnp.rnp_unlearn + recover_masks with RNPConfig (recover_epochs from the flag).
The official scripts cannot be imported as modules here: both import torchvision at the top (not installed in
this venv), optimize_mask_cifar.py parses required arguments at import, and RNP's main.py imports
`datasets.poison_tool_cifar`, a module its repository does not have (it ships data/poison_tool_cifar.py). So the
named function definitions are taken from the files with `ast` and exec'd unchanged into a namespace holding the
globals they use (torch, nn, `models` -> the official norm classes, `args` -> the official defaults, device cpu).
The RNGs differ: the official code draws from torch's global RNG (torch.manual_seed(seed) before each official
run), ours from a torch.Generator seeded with seed; the batches and noise draws are therefore not the same.

Compared, per method: the Spearman rank correlation of the official and our masks over all BatchNorm channels
(average ranks for ties), the overlap of the k lowest-mask channels (k = 10, 20, 50; ties broken by module order),
and CA / ASR on the test split after pruning the k lowest-mask channels of the original model (k = 10, 20, 50,
100) for each side's masks. Pruning is the official `pruning()` of prune_neuron_cifar.py / RNP main.py: the
channel's BatchNorm weight set to 0, its bias left as is. --noise-floor ANP,RNP also runs the official code a
second time with seed + 1 and reports the same agreement between the two official runs: the spread to expect from
the RNG alone. --json writes the table, the run times, the unlearning epochs and both sides' masks.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import importlib.util
import json
import math
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn as nn
from quality import backdoored, ev
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from onp_fast.data import defense_subset, load_dataset, normalize
from onp_fast.defenses import anp as anp_module
from onp_fast.defenses import rnp as rnp_module
from onp_fast.defenses.anp import ANPConfig, anp_masks
from onp_fast.defenses.rnp import RNPConfig, recover_masks, rnp_unlearn

TOPK = (10, 20, 50)
PRUNE_K = (10, 20, 50, 100)


def load_file_module(path: Path, name: str) -> types.ModuleType:
    """Executes the official file `path` as a module called `name` (not registered in sys.modules)."""
    if not path.is_file():
        raise SystemExit(f"official file not found: {path}")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_functions(path: Path, names: list[str], namespace: dict) -> dict:
    """Execs the top-level `def`s called `names` of the official file `path` (their source unchanged) into
    `namespace`, which must hold the globals they use -> namespace."""
    if not path.is_file():
        raise SystemExit(f"official file not found: {path}")
    tree = ast.parse(path.read_text(), filename=str(path))
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    missing = set(names) - {d.name for d in defs}
    if missing:
        raise SystemExit(f"{path} has no function {', '.join(sorted(missing))}")
    exec(compile(ast.Module(body=defs, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def swap_batchnorm(model: nn.Module, cls: type) -> nn.Module:
    """Replaces every nn.BatchNorm2d of `model` (in place) by `cls` with the same options, weights and running
    statistics; the official extra parameters keep their official initial values -> model."""
    for name, mod in list(model.named_modules()):
        if type(mod) is not nn.BatchNorm2d:
            continue
        new = cls(mod.num_features, mod.eps, mod.momentum, mod.affine, mod.track_running_stats)
        res = new.load_state_dict(mod.state_dict(), strict=False)
        if res.unexpected_keys or any(not k.startswith("neuron_") for k in res.missing_keys):
            raise SystemExit(f"cannot copy {name} into {cls.__name__}: {res}")
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], new.to(mod.weight.device))
    return model


def official_masks(model: nn.Module, cls: type) -> dict[str, torch.Tensor]:
    return {n: m.neuron_mask.detach().cpu().clone() for n, m in model.named_modules() if isinstance(m, cls)}


def official_anp(code: Path, model, x, y, iterations: int, cfg: ANPConfig, seed: int) -> dict[str, torch.Tensor]:
    bn = load_file_module(code / "models" / "anp_batchnorm.py", "anp_official_batchnorm")
    ns = {"torch": torch, "device": "cpu",
          "models": types.SimpleNamespace(NoisyBatchNorm2d=bn.NoisyBatchNorm2d, NoisyBatchNorm1d=bn.NoisyBatchNorm1d),
          "args": argparse.Namespace(anp_eps=cfg.eps, anp_steps=cfg.noise_steps, anp_alpha=cfg.alpha)}
    load_functions(code / "optimize_mask_cifar.py",
                   ["clip_mask", "sign_grad", "include_noise", "exclude_noise", "reset", "mask_train"], ns)
    torch.manual_seed(seed)
    net = swap_batchnorm(copy.deepcopy(model), bn.NoisyBatchNorm2d)
    criterion = nn.CrossEntropyLoss()
    parameters = list(net.named_parameters())
    mask_optimizer = torch.optim.SGD([v for n, v in parameters if "neuron_mask" in n], lr=cfg.mask_lr, momentum=0.9)
    noise_optimizer = torch.optim.SGD([v for n, v in parameters if "neuron_noise" in n],
                                      lr=cfg.eps / cfg.noise_steps)
    print_every = min(500, iterations)
    data = TensorDataset(x, y)
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=False, num_workers=0,
                        sampler=RandomSampler(data, replacement=True, num_samples=print_every * cfg.batch_size))
    for _ in range(math.ceil(iterations / print_every)):
        loss, acc = ns["mask_train"](model=net, criterion=criterion, data_loader=loader, mask_opt=mask_optimizer,
                                     noise_opt=noise_optimizer)
        print(f"    official mask_train: loss {loss:.4f} acc {acc:.4f}", flush=True)
    return official_masks(net, bn.NoisyBatchNorm2d)


def official_rnp(code: Path, model, x, y, cfg: RNPConfig, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    bn = load_file_module(code / "models" / "mask_batchnorm.py", "rnp_official_batchnorm")
    ns = {"torch": torch, "nn": nn, "device": "cpu"}
    load_functions(code / "main.py", ["train_step_unlearning", "train_step_recovering", "clip_mask"], ns)
    args = argparse.Namespace(alpha=cfg.alpha, clean_threshold=cfg.unlearn_target, unlearning_lr=cfg.unlearn_lr,
                              recovering_lr=cfg.recover_lr, unlearning_epochs=cfg.unlearn_epochs,
                              recovering_epochs=cfg.recover_epochs, schedule=list(cfg.unlearn_milestones),
                              batch_size=cfg.batch_size)
    torch.manual_seed(seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True)
    net = copy.deepcopy(model)
    for p in net.parameters():
        p.requires_grad_(True)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=args.unlearning_lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.schedule, gamma=0.1)
    accs = []
    for _ in range(0, args.unlearning_epochs + 1):
        _, acc = ns["train_step_unlearning"](args=args, model=net, criterion=criterion, optimizer=optimizer,
                                             data_loader=loader)
        scheduler.step()
        accs.append(acc)
        if acc <= args.clean_threshold:
            break
    unlearned = swap_batchnorm(copy.deepcopy(net), bn.MaskBatchNorm2d)
    mask_optimizer = torch.optim.SGD([v for n, v in unlearned.named_parameters() if "neuron_mask" in n],
                                     lr=args.recovering_lr, momentum=0.9)
    for _ in range(1, args.recovering_epochs + 1):
        ns["train_step_recovering"](args=args, unlearned_model=unlearned, criterion=criterion,
                                    data_loader=loader, mask_opt=mask_optimizer)
    return official_masks(unlearned, bn.MaskBatchNorm2d), {"epochs": len(accs), "epoch_accuracy": accs,
                                                             "reached": accs[-1] <= args.clean_threshold}


def _loader_seed() -> int:
    """One draw of torch's global RNG as DataLoader makes it (an iterator's base seed, a RandomSampler's seed)."""
    return int(torch.empty((), dtype=torch.int64).random_().item())


@contextlib.contextmanager
def aligned_rng(seed: int, anp_calls: int):
    """Within: our ANP and RNP draw their batches and noise starts from torch's global RNG exactly as the official
    code does (torch.manual_seed(seed) first), instead of from their seeded Generator, so the two sides see the
    same batches and the same noise. Official draws replicated: each DataLoader epoch takes the iterator's base seed
    and the RandomSampler's seed from the global RNG, then shuffles (randperm) or samples with replacement (randint
    in chunks of 32) from a Generator holding that seed; ANP's `reset(rand_init=True)` fills noise then noise bias
    of each NoisyBatchNorm2d, in module order, with uniform_(-eps, eps). anp_calls: ANP iterations per official
    `mask_train` call (one DataLoader pass, print_every). The masked BatchNorm arithmetic is already the
    official one in the library (anp.ScaledNorms), so what is left is nothing but the algorithm."""
    state = {"count": 0, "gen": None, "pending": torch.zeros(0, dtype=torch.int64)}

    def anp_batch(n, batch_size, g):
        if state["count"] % anp_calls == 0:
            _loader_seed()
            state["gen"] = torch.Generator().manual_seed(_loader_seed())
            state["pending"] = torch.zeros(0, dtype=torch.int64)
        state["count"] += 1
        while len(state["pending"]) < batch_size:
            state["pending"] = torch.cat([state["pending"], torch.randint(high=n, size=(32,), dtype=torch.int64,
                                                                          generator=state["gen"])])
        idx, state["pending"] = state["pending"][:batch_size], state["pending"][batch_size:]
        return idx

    def anp_start(p, eps, g):
        for n in p.names:
            p.noise[n] = torch.empty(len(p.noise[n])).uniform_(-eps, eps)
            p.noise_b[n] = torch.empty(len(p.noise_b[n])).uniform_(-eps, eps)

    def rnp_epoch(n, batch_size, g, train):
        _loader_seed()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(_loader_seed()))
        out = [order[i:i + batch_size] for i in range(0, n, batch_size)]
        return [b for b in out if len(b) > 1] if train else out

    patches = [(anp_module, "batch_indices", anp_batch), (anp_module, "random_start", anp_start),
               (rnp_module, "_batches", rnp_epoch)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    for mod, name, value in patches:
        setattr(mod, name, value)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


def flat(masks: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([masks[n].flatten().double() for n in names])


def average_ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of v, tied values sharing their mean rank."""
    order = torch.argsort(v, stable=True)
    sv = v[order]
    ranks = torch.empty_like(v)
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def lowest(v: torch.Tensor, k: int) -> torch.Tensor:
    return torch.argsort(v, stable=True)[:k]


def prune_lowest(model: nn.Module, masks: dict[str, torch.Tensor], names: list[str], k: int) -> nn.Module:
    """A copy of `model` with the BatchNorm weight of the k lowest-mask channels set to 0 (the official
    `pruning()`; bias untouched)."""
    out = copy.deepcopy(model).eval()
    sizes = [len(masks[n]) for n in names]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    with torch.no_grad():
        for j in lowest(flat(masks, names), k).tolist():
            i = max(i for i, s in enumerate(starts) if s <= j)
            out.get_submodule(names[i]).weight[j - starts[i]] = 0.0
    return out


def agreement(masks_a, masks_b) -> dict:
    """Spearman and top-k overlap of two mask sets over all channels, with their counts <= 0.2 and == 0."""
    names = list(masks_b)
    if set(names) != set(masks_a):
        raise SystemExit(f"mask layers differ: {sorted(masks_a)} vs {sorted(names)}")
    a, b = flat(masks_a, names), flat(masks_b, names)
    return {"channels": len(a), "spearman": spearman(a, b),
            "topk_overlap": {k: len(set(lowest(a, k).tolist()) & set(lowest(b, k).tolist())) / k for k in TOPK},
            "below_0.2": [int((a <= 0.2).sum()), int((b <= 0.2).sum())],
            "at_0": [int((a == 0).sum()), int((b == 0).sum())]}


def compare(model, masks_off, masks_ours, splits, attack) -> dict:
    names = list(masks_ours)
    row = {**agreement(masks_off, masks_ours), "prune": {},
           "masks": {"layers": names, "official": flat(masks_off, names).tolist(),
                     "ours": flat(masks_ours, names).tolist()}}
    for side, m in (("official", masks_off), ("ours", masks_ours)):
        row["prune"][side] = {}
        for k in PRUNE_K:
            r = ev(prune_lowest(model, m, names, k), splits, attack)
            row["prune"][side][k] = {"ca": r["ca"], "asr": r["asr"]}
    return row


def rnp_seed_sweep(code: Path, model, xn, y, cfg: RNPConfig, seeds) -> dict:
    """Official and our RNP under each seed -> {"runs": [{"side", "seed", "unlearn_epochs"}], "mean_spearman":
    {pair kind: mean over pairs}, "pairs": [[i, j, spearman]]}; printed as it goes."""
    runs, masks = [], []
    for seed in seeds:
        off, info = official_rnp(code, model, xn, y, cfg, seed)
        runs.append({"side": "official", "seed": seed, "unlearn_epochs": info["epochs"]})
        masks.append(off)
        u, ours_info = rnp_unlearn(model, xn, y, cfg, seed=seed)
        masks.append(recover_masks(u, None, xn, y, lr=cfg.recover_lr, epochs=cfg.recover_epochs, alpha=cfg.alpha,
                                   batch_size=cfg.batch_size, seed=seed, mask_on=cfg.mask_on, bn_mode=cfg.bn_mode))
        runs.append({"side": "ours", "seed": seed, "unlearn_epochs": ours_info["epochs"]})
        print(f"  RNP seed {seed}: unlearning epochs official {info['epochs']}, ours {ours_info['epochs']}", flush=True)
    names = list(masks[0])
    flats = [flat(m, names) for m in masks]
    pairs, kinds = [], {}
    for i in range(len(runs)):
        for j in range(i + 1, len(runs)):
            rho = spearman(flats[i], flats[j])
            pairs.append([i, j, rho])
            kind = "/".join(sorted((runs[i]["side"], runs[j]["side"])))
            same = runs[i]["unlearn_epochs"] == runs[j]["unlearn_epochs"]
            for key in (kind, f"{kind} ({'same' if same else 'different'} unlearning epochs)"):
                kinds.setdefault(key, []).append(rho)
    mean = {k: sum(v) / len(v) for k, v in sorted(kinds.items())}
    print("\nRNP over seeds: mean Spearman (pairs)")
    for k, v in mean.items():
        print(f"  {k:<48} {v:.4f} ({len(kinds[k])})")
    return {"runs": runs, "mean_spearman": mean, "pairs": pairs}


def print_table(before, rows, seed):
    print(f"\nbefore pruning: CA {100 * before['ca']:.2f}  ASR {100 * before['asr']:.2f}")
    print("\nmethod | compared                    | channels | Spearman | top-10 | top-20 | top-50 | masks <= 0.2 | "
          "masks == 0")
    for method, r in rows.items():
        pairs = [("official vs ours", r)]
        if "noise_floor" in r:
            pairs.append((f"official s{seed} vs official s{seed + 1}", r["noise_floor"]))
        for label, a in pairs:
            ov = a["topk_overlap"]
            print(f"{method:<6} | {label:<27} | {a['channels']:8d} | {a['spearman']:8.4f} | {ov[10]:6.2f} | "
                  f"{ov[20]:6.2f} | {ov[50]:6.2f} | {a['below_0.2'][0]:>5} / {a['below_0.2'][1]:<4} | "
                  f"{a['at_0'][0]} / {a['at_0'][1]}")
    print("(top-k: the k lowest masks, ties broken by module order; with many masks at 0 the top-k sets and the "
          "pruned channels inside a tie are decided by that order)")
    head = " | ".join(f"k={k:<3d} CA / ASR " for k in PRUNE_K)
    print(f"\nmethod | side     | {head}")
    for method, r in rows.items():
        for side in ("official", "ours"):
            cells = " | ".join(f"{100 * r['prune'][side][k]['ca']:5.2f} / {100 * r['prune'][side][k]['asr']:5.2f}"
                               for k in PRUNE_K)
            print(f"{method:<6} | {side:<8} | {cells}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anp-code", type=Path, default=None, help="checkout of csdongxian/ANP_backdoor")
    ap.add_argument("--rnp-code", type=Path, default=None, help="checkout of bboylyg/RNP")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--attack", default="badnets")
    ap.add_argument("--arch", default="preactresnet18")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=30, help="training epochs of the cached model (its file name)")
    ap.add_argument("--defense-size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--anp-iterations", type=int, default=2000)
    ap.add_argument("--rnp-recover-epochs", type=int, default=20, help="recovery epochs, both sides (official 20)")
    ap.add_argument("--noise-floor", default="", metavar="ANP,RNP",
                    help="for these methods also run the official code with seed + 1 and report its agreement with "
                         "the seed run (how far two official runs differ)")
    ap.add_argument("--rnp-seeds", type=int, default=0, metavar="N",
                    help="instead of the one-seed comparison of RNP: run the official code and ours with seeds "
                         "seed .. seed + N - 1 each and print the mean Spearman of official/official, ours/ours "
                         "and official/ours pairs, with every run's unlearning epochs")
    ap.add_argument("--aligned-rng", action="store_true",
                    help="our side draws its batches and noise from torch's global RNG as the official code does "
                         "(see aligned_rng), so both sides see the same batches: what remains is the algorithm")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.anp_code is None and args.rnp_code is None:
        ap.error("give --anp-code and/or --rnp-code")
    floor = {m.strip().upper() for m in args.noise_floor.split(",") if m.strip()}
    if floor - {"ANP", "RNP"}:
        ap.error(f"--noise-floor takes ANP and/or RNP, not {args.noise_floor!r}")
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    splits = load_dataset(args.dataset, seed=args.seed)
    model, attack = backdoored(args.dataset, splits, args.attack, args.arch, args.width, args.epochs, args.seed)
    x, y = defense_subset(splits, args.defense_size, seed=args.seed)
    xn = normalize(x, splits.mean, splits.std)
    before = ev(model, splits, attack)
    rows, info = {}, {}
    if args.aligned_rng:
        print("note: --aligned-rng: our side draws batches and noise from the global RNG as the official code does",
              flush=True)
    else:
        print("note: the official code draws from torch's global RNG (torch.manual_seed(seed)), ours from a seeded "
              "torch.Generator: same seed, different batches and noise.", flush=True)
    if args.anp_code is not None:
        cfg = ANPConfig(iterations=args.anp_iterations)
        t = time.perf_counter()
        off = official_anp(args.anp_code, model, xn, y, args.anp_iterations, cfg, args.seed)
        t_off = time.perf_counter() - t
        t = time.perf_counter()
        with (aligned_rng(args.seed, min(500, args.anp_iterations)) if args.aligned_rng
              else contextlib.nullcontext()):
            ours = anp_masks(model, xn, y, cfg, seed=args.seed)
        t_ours = time.perf_counter() - t
        print(f"  ANP ({args.anp_iterations} iterations): official {t_off:.0f}s, ours {t_ours:.0f}s", flush=True)
        rows["ANP"] = compare(model, off, ours, splits, attack)
        if "ANP" in floor:
            rows["ANP"]["noise_floor"] = agreement(
                off, official_anp(args.anp_code, model, xn, y, args.anp_iterations, cfg, args.seed + 1))
        info["ANP"] = {"iterations": args.anp_iterations, "seconds": {"official": t_off, "ours": t_ours}}
    if args.rnp_code is not None and args.rnp_seeds > 0:
        rows["RNP seeds"] = rnp_seed_sweep(args.rnp_code, model, xn, y, RNPConfig(recover_epochs=args.rnp_recover_epochs),
                                           range(args.seed, args.seed + args.rnp_seeds))
    elif args.rnp_code is not None:
        cfg = RNPConfig(recover_epochs=args.rnp_recover_epochs)
        t = time.perf_counter()
        off, off_unlearn = official_rnp(args.rnp_code, model, xn, y, cfg, args.seed)
        t_off = time.perf_counter() - t
        t = time.perf_counter()
        with aligned_rng(args.seed, 1) if args.aligned_rng else contextlib.nullcontext():
            u, our_unlearn = rnp_unlearn(model, xn, y, cfg, seed=args.seed)
            ours = recover_masks(u, None, xn, y, lr=cfg.recover_lr, epochs=cfg.recover_epochs, alpha=cfg.alpha,
                                 batch_size=cfg.batch_size, seed=args.seed, mask_on=cfg.mask_on,
                                 bn_mode=cfg.bn_mode)
        t_ours = time.perf_counter() - t
        print(f"  RNP ({cfg.recover_epochs} recovery epochs): official {t_off:.0f}s, ours {t_ours:.0f}s\n"
              f"  unlearning epochs / last accuracy: official {off_unlearn['epochs']} / "
              f"{off_unlearn['epoch_accuracy'][-1]:.4f}, ours {our_unlearn['epochs']} / "
              f"{our_unlearn['accuracy']:.4f}", flush=True)
        rows["RNP"] = compare(model, off, ours, splits, attack)
        if "RNP" in floor:
            rows["RNP"]["noise_floor"] = agreement(off, official_rnp(args.rnp_code, model, xn, y, cfg,
                                                                     args.seed + 1)[0])
        info["RNP"] = {"recover_epochs": cfg.recover_epochs, "seconds": {"official": t_off, "ours": t_ours},
                       "unlearn": {"official": off_unlearn,
                                   "ours": {k: our_unlearn[k] for k in ("epochs", "epoch_accuracy", "reached")}}}
    print_table(before, {k: v for k, v in rows.items() if k != "RNP seeds"}, args.seed)
    wall = time.perf_counter() - t_all
    print(f"\nwall time {wall:.0f}s ({args.threads} thread(s))")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "before": before,
                                               "rows": rows, "runs": info, "wall_s": wall,
                                               "rng_note": ("both: torch global RNG, aligned" if args.aligned_rng else
                                                            "official: torch global RNG; ours: seeded Generator")},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
