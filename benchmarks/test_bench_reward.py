"""Reward engine benchmarks (slow; not part of `make test`): op vs the per-mask loop vs the naive K*B batch
on issue 5's grid point subset, and the peak memory of a budget that forces chunking.

Run: .venv/bin/python -m pytest -q benchmarks/test_bench_reward.py [--benchmark-disable for memory only]
Peak memory method: a fresh subprocess (glibc told to mmap every block >= 64 KiB and trim at once, so RSS
follows live memory) builds everything, runs a one-mask warm-up call, resets the kernel's peak-RSS counter
(`echo 5 > /proc/self/clear_refs`), runs one score call, and reports VmHWM - VmRSS(before): the resident
memory the call added at its peak (activations, chunk buffers, oneDNN scratch), compared with max_memory.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from onp_fast.bench.reward import PRUNE_P, bernoulli_masks
from onp_fast.models import build
from onp_fast.reward.reference import loop_reference, naive_batch_reference
from onp_fast.reward import RewardEngine, bn_neurons

_PEAK_SCRIPT = r"""
import gc, json, sys, torch
from onp_fast.models import build
from onp_fast.reward import RewardEngine, bn_neurons
from onp_fast.bench.reward import bernoulli_masks
strategy, chunk_masks, k, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
torch.manual_seed(0)
model = build("preactresnet18", width=width).eval()
images, labels = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
masks = bernoulli_masks(k, bn_neurons(model).size, 0.5, seed=k)
probe = RewardEngine(model, strategy=strategy)
shared, per_mask = probe.memory_per_mask(images)
budget = shared + chunk_masks * per_mask + per_mask // 4
engine = RewardEngine(model, strategy=strategy, max_memory=budget)
chunk = engine.chunk(k, images)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
engine.score(masks[:1], images, labels)  # warm-up: oneDNN kernels, thread pool, caches
gc.collect()
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
engine.score(masks, images, labels)
peak = status("VmHWM:") - before
print(json.dumps({"strategy": strategy, "budget": budget, "chunk": chunk, "peak": peak, "shared": shared,
                  "per_mask": per_mask}))
"""


def measure_peak(strategy: str, chunk_masks: int, k: int = 16, width: float = 0.25) -> dict:
    """Runs _PEAK_SCRIPT in a fresh interpreter; returns budget, chunk, peak (bytes) and the estimates."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, strategy, str(chunk_masks), str(k), str(width)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("strategy", ["sliced", "batched"])
def test_peak_memory_under_budget(strategy):
    r = measure_peak(strategy, chunk_masks=4 if strategy == "batched" else 1)
    print(f"\n{strategy}: budget {r['budget'] / 2**20:.1f} MiB, chunk {r['chunk']} of 16, "
          f"peak added RSS {r['peak'] / 2**20:.1f} MiB")
    if strategy == "batched":
        assert r["chunk"] == 4
    assert r["peak"] <= r["budget"]


@pytest.fixture(scope="module")
def point():
    torch.manual_seed(0)
    model = build("preactresnet18", width=0.25).eval()
    images, labels = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    masks = bernoulli_masks(16, bn_neurons(model).size, PRUNE_P, seed=16)
    return model, images, labels, masks


def test_bench_loop(benchmark, point):
    model, images, labels, masks = point
    benchmark.pedantic(lambda: loop_reference(model, masks, images, labels), rounds=3, warmup_rounds=1)


def test_bench_op(benchmark, point):
    model, images, labels, masks = point
    engine = RewardEngine(model)
    benchmark.pedantic(lambda: engine.score(masks, images, labels), rounds=3, warmup_rounds=1)


def test_bench_naive(benchmark, point):
    model, images, labels, masks = point
    benchmark.pedantic(lambda: naive_batch_reference(model, masks, images, labels, chunk=16), rounds=3,
                       warmup_rounds=1)
