"""onp-fast: repair backdoored neural networks by optimized neuron pruning.

The folders are the pipeline: models/ data/ attacks/ (what a user brings) -> groups/ (neuron units, coupled
groups) -> reward/ (the reward of masks, the batched engine) -> prepare/ (what every defense shares) ->
defenses/ (ONP and the baselines rank the groups) -> repair/ (the one entry point: depth rule, apply, report)
-> cli/. C++/CUDA ops live in onp_fast.ops. See docs/design.md.
"""
__version__ = "0.1.0"
