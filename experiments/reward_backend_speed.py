"""The reward backends side by side on one model: "engine" (RewardEngine over the groups' mask points) against
"hooks" (one hooked forward per mask), same prepared context, same thread count.

    python experiments/reward_backend_speed.py MODEL.pt --dataset digits --threads 2 --mode calls
    python experiments/reward_backend_speed.py MODEL.pt --dataset digits --threads 2 --mode policy --repeats 1

--mode calls:  the reward of K masks drawn like the policy's first samples (prune probability 0.02), per call:
               median seconds of hooks, engine/sliced and engine/batched, alternating, and whether their rewards
               agree.
--mode policy: ONP's scoring (features, graphs, policy) then the depth rule, once per backend per repeat
               (alternating order), with the policy phase's seconds, masks/s, images/s; then whether the two
               backends drew the same masks (reward curve, pruned fraction) and chose the same prune set.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch

from onp_fast.data import defense_subset, normalize
from onp_fast.cli.options import load_model_and_data
from onp_fast.defenses import ONPConfig
from onp_fast.prepare import RepairConfig, prepare
from onp_fast.repair.pipeline import run
from onp_fast.reward import MaskScorer


def context(args):
    """The shared preparation (split, groups, unlearning, trigger proxy) on the model's defense set; kept in
    --cache (a torch.save file) when given, and loaded from it on later runs."""
    if args.cache and os.path.exists(args.cache):
        ctx = torch.load(args.cache, weights_only=False)
        print(f"prepared context from {args.cache}: {ctx.times}")
        return ctx
    loaded, splits, mean, std = load_model_and_data(args.model, args.dataset, seed=args.seed)
    x, y = defense_subset(splits, args.defense_size, seed=args.seed)
    cfg = RepairConfig(seed=args.seed, purify="none")
    t = time.perf_counter()
    ctx = prepare(loaded.model, normalize(x, mean, std), y, splits.num_classes, cfg, progress=False)
    print(f"prepare: {time.perf_counter() - t:.1f}s {ctx.times}; groups {ctx.groups.num_groups}; "
          f"trigger proxy flagged: {ctx.trigger is not None}")
    if args.cache:
        torch.save(ctx, args.cache)
    return ctx


def scorer(ctx, backend: str, strategy: str = "auto") -> MaskScorer:
    base = ctx.scorer("opt")
    return MaskScorer(ctx.groups, ctx.model, base.x, base.y, ctx.cfg.weights, ctx.unlearned, ctx.perturbations,
                      ctx.trigger, backend=backend, strategy=strategy)


def calls(ctx, args):
    g = torch.Generator().manual_seed(args.seed)
    prune = torch.rand(args.samples, ctx.groups.num_groups, generator=g) < args.prune_prob
    variants = {"hooks": scorer(ctx, "hooks"), "engine/sliced": scorer(ctx, "engine", "sliced"),
                "engine/batched": scorer(ctx, "engine", "batched")}
    times = {k: [] for k in variants}
    rewards = {}
    for name, s in variants.items():  # warm-up (engine compilation, allocator)
        rewards[name] = s(prune)
    for _ in range(args.repeats):
        for name, s in variants.items():
            t = time.perf_counter()
            s(prune)
            times[name].append(time.perf_counter() - t)
    per_mask = variants["hooks"].images_per_mask()
    base = statistics.median(times["hooks"])
    print(f"K = {args.samples} masks, {per_mask} image forwards per mask, {torch.get_num_threads()} threads, "
          f"{args.repeats} repeats (median s per call)")
    for name, ts in times.items():
        med = statistics.median(ts)
        diff = float((rewards[name] - rewards["hooks"]).abs().max())
        print(f"  {name:<15} {med:7.3f}s  {args.samples / med:7.1f} masks/s  {args.samples * per_mask / med:9.0f} "
              f"images/s  x{base / med:5.2f} vs hooks  max |reward - hooks| {diff:.2e}")


def policy(ctx, args):
    onp = ONPConfig(iterations=args.iterations, samples=args.samples)
    results = {"engine": [], "hooks": []}
    order = ["hooks", "engine"]
    for r in range(args.repeats):
        for backend in order if r % 2 == 0 else order[::-1]:
            ctx.cfg = dataclasses.replace(ctx.cfg, reward_backend=backend)
            res = run(ctx, "onp", onp)
            pr = res.report["details"]["policy_reward"]
            results[backend].append(res)
            print(f"  {backend:<7} policy {pr['seconds']:7.1f}s  {pr['masks_per_s']:6.1f} masks/s  "
                  f"{pr['images_per_s']:8.0f} images/s  select {res.report['method_times_s'].get('select', 0):.1f}s "
                  f"phases {res.report['method_times_s']}")
    med = {b: statistics.median(r.report["details"]["policy_reward"]["seconds"] for r in rs)
           for b, rs in results.items()}
    print(f"policy phase, {torch.get_num_threads()} threads, median of {args.repeats}: hooks {med['hooks']:.1f}s, "
          f"engine {med['engine']:.1f}s, x{med['hooks'] / med['engine']:.2f}")
    a, b = results["engine"][0], results["hooks"][0]
    ca, cb = a.report["details"]["reward_curve"], b.report["details"]["reward_curve"]
    first = next((i for i, (u, v) in enumerate(zip(ca["prune_frac"], cb["prune_frac"])) if u != v), None)
    upto = len(ca["mean"]) if first is None else first
    before = max((abs(u - v) for u, v in zip(ca["mean"][:upto], cb["mean"][:upto])), default=0.0)
    print(f"same sampled masks (pruned fraction per iteration): "
          f"{'all iterations' if first is None else f'iterations 0..{first - 1}, first differs at {first}'}; "
          f"max |mean reward diff| while the masks agree {before:.2e}; max |score diff| "
          f"{float((a.scores - b.scores).abs().max()):.2e}; same prune set: {torch.equal(a.prune, b.prune)} "
          f"({int(a.prune.sum())} vs {int(b.prune.sum())} groups)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--defense-size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", choices=["calls", "policy"], default="calls")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--prune-prob", type=float, default=0.02)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache", default=None, help="torch.save file of the prepared context (made on first use)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ctx = context(args)
    calls(ctx, args) if args.mode == "calls" else policy(ctx, args)


if __name__ == "__main__":
    main()
