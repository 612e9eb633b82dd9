"""pytest-benchmark: the neuron_graphs op vs its pure-PyTorch reference on PreActResNet-18's weights
(the same comparison as `onp-fast bench`). Run: .venv/bin/python -m pytest benchmarks/test_bench_neuron_graphs.py"""
from __future__ import annotations

import pytest
import torch

from onp_fast.bench.graphs import preactresnet18_weights
from onp_fast.ops import neuron_graphs
from onp_fast.ops.reference import neuron_graphs_reference

SETTINGS = [(0.5, 0), (0.9, 3)]


@pytest.fixture(scope="module")
def weights():
    return preactresnet18_weights()


@pytest.mark.parametrize("eps, topk", SETTINGS)
@pytest.mark.benchmark(group="neuron_graphs/preactresnet18")
def test_op_cpu(benchmark, weights, eps, topk):
    g = benchmark(neuron_graphs, weights, eps, 0.05, topk)
    assert g.num_edges > 0


@pytest.mark.parametrize("eps, topk", SETTINGS)
@pytest.mark.benchmark(group="neuron_graphs/preactresnet18")
def test_reference(benchmark, weights, eps, topk):
    out = benchmark(neuron_graphs_reference, weights, eps, 0.05, topk)
    assert out[0].shape[1] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.benchmark(group="neuron_graphs/preactresnet18/cuda")
def test_cuda(benchmark, weights, impl):
    w = [x.cuda() for x in weights]
    fn = neuron_graphs if impl == "op" else neuron_graphs_reference

    def call():
        out = fn(w, 0.5, 0.05, 3)
        torch.cuda.synchronize()
        return out

    benchmark(call)
