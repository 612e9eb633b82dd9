"""Command-line options shared by the benchmark scripts that train or repair backdoored models."""
from __future__ import annotations

import argparse

import torch

from onp_fast import attacks
from onp_fast.torchutil import keep_freed_memory


def add_model_options(ap: argparse.ArgumentParser) -> None:
    """The cached models' recipe (experiments/quality.py's cache): --dataset, --attacks (comma-separated), --arch,
    --width, --epochs."""
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--attacks", default="badnets,blended,wanet,sig")
    ap.add_argument("--arch", default="preactresnet18")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=30)


def add_run_options(ap: argparse.ArgumentParser) -> None:
    """--threads (torch CPU threads) and --param ATTACK.KEY=VALUE (attack parameters, repeatable)."""
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--param", action="append", default=[], metavar="ATTACK.KEY=VALUE",
                    help="an attack parameter, e.g. sig.train_delta=0.098 (repeatable)")


def apply_run_options(args: argparse.Namespace) -> dict[str, dict]:
    """Sets the thread count and, as the CLI does, keeps the allocator's freed pages (torchutil.keep_freed_memory)
    -> {attack name: its parameters}."""
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    return attacks.params_by_attack(args.param)
