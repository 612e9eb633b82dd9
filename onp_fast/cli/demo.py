"""`onp-fast demo`: builds the neuron graphs of a built-in PreActResNet-18 and prints a per-layer summary."""
from __future__ import annotations

import click


@click.command("demo")
@click.option("--seed", default=0, show_default=True, help="Seed of the random initialisation.")
@click.option("--eps", default=0.5, show_default=True, type=click.FloatRange(-1.0, 1.0),
              help="Cosine threshold of an intra-layer edge.")
@click.option("--dormant-quantile", default=0.05, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Per-layer quantile of ||q||_1 below which a neuron is dormant.")
@click.option("--cross-layer-topk", default=3, show_default=True, type=click.IntRange(min=0),
              help="Cross-layer edges per neuron (0: none).")
def command(seed: int, eps: float, dormant_quantile: float, cross_layer_topk: int) -> None:
    """Neuron graphs of a built-in PreActResNet-18 (the end-to-end repair demo comes with the repair pipeline)."""
    from ..demo import run

    run(seed=seed, eps=eps, dormant_quantile=dormant_quantile, cross_layer_topk=cross_layer_topk, echo=click.echo)
