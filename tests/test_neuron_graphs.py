"""neuron_graphs op (C++ CPU, CUDA when present) against its pure-PyTorch reference, over a parametrised grid."""
from __future__ import annotations

import pytest
import torch

from onp_fast.ops import NeuronGraphs, neuron_graphs
from onp_fast.ops.neuron_graphs import load_op
from onp_fast.ops.reference import neuron_graphs_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = [-1.0, 0.0, 0.5, 1.0]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def chain(kind: str, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """Consecutive layers whose shapes chain (C_in of l+1 == C_out of l), plus one that does not."""
    g = torch.Generator().manual_seed(seed)
    if kind == "conv":
        shapes = [(6, 3, 3, 3), (9, 6, 3, 3), (12, 9, 1, 1), (5, 7, 3, 3)]
    else:
        shapes = [(7, 5), (11, 7), (4, 11), (6, 3)]
    w = [torch.randn(*s, generator=g) for s in shapes]
    w[1][4] = -w[1][2]  # same q: linked even at eps = 1
    return [x.to(dtype) for x in w]


def assert_same(got, want) -> None:
    got, want = tuple(got), tuple(want)
    edge_index, edge_weight, node_layer, layer_offsets, feats = got
    assert torch.equal(edge_index, want[0]), "edge sets or order differ"
    assert edge_weight.dtype == torch.float32 and feats.dtype == torch.float32
    torch.testing.assert_close(edge_weight, want[1], rtol=1e-5, atol=1e-7)
    assert torch.equal(node_layer, want[2])
    assert torch.equal(layer_offsets, want[3])
    torch.testing.assert_close(feats, want[4], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cross", [0, 3])
@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(dtype, kind, eps, cross):
    w = chain(kind, dtype)
    got = neuron_graphs(w, eps=eps, dormant_quantile=0.2, cross_layer_topk=cross)
    assert_same(got, neuron_graphs_reference(w, eps, 0.2, cross))
    assert got.num_edges > 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch_geometric's own torch.jit use
def test_outputs_layout():
    w = chain("conv", torch.float32)
    g = neuron_graphs(w, eps=0.5, dormant_quantile=0.2, cross_layer_topk=2)
    n = sum(x.shape[0] for x in w)
    assert isinstance(g, NeuronGraphs)
    assert g.edge_index.shape[0] == 2 and g.edge_index.dtype == torch.int64
    assert g.node_layer.tolist() == [l for l, x in enumerate(w) for _ in range(x.shape[0])]
    assert g.layer_offsets.tolist() == [0, 6, 15, 27, 32]
    assert g.node_features.shape == (n, 5)
    q = w[1].abs().double().sum((2, 3))
    f = g.node_features[6:15].double()
    torch.testing.assert_close(f[:, 0], q.sum(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(f[:, 1], q.mean(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(f[:, 2], q.amax(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(f[:, 3], q.std(1, unbiased=False), rtol=1e-5, atol=1e-7)
    # dormant: below the linear-interpolation 0.2-quantile of the layer's L1 norms
    l1 = q.sum(1)
    assert f[:, 4].tolist() == (l1 >= torch.quantile(l1, 0.2)).double().tolist()
    src, dst = g.edge_index
    intra = g.node_layer[src] == g.node_layer[dst]
    # intra edges: symmetric, no self loops, between active nodes; cross edges go from layer l+1 to layer l
    pairs = set(zip(src[intra].tolist(), dst[intra].tolist()))
    assert all((j, i) in pairs for i, j in pairs) and all(i != j for i, j in pairs)
    assert bool((g.node_features[src[intra], 4] == 1).all())
    assert torch.equal(g.node_layer[src[~intra]] - 1, g.node_layer[dst[~intra]])
    # layer 3 (C_in 7) does not chain with layer 2 (C_out 12): no cross edges from it
    assert not bool((g.node_layer[src[~intra]] == 3).any())
    data = g.to_pyg()
    assert data.num_nodes == n and data.edge_attr.shape == (g.num_edges, 1)


def test_cosine_threshold_and_topk_by_hand():
    w0 = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # q rows: (1,0), (2,0), (0,1)
    w1 = torch.tensor([[0.5, -3.0, 0.5], [0.0, 0.0, 0.0]])
    g = neuron_graphs([w0, w1], eps=0.9, dormant_quantile=0.0, cross_layer_topk=2)
    intra = g.edge_index[:, g.node_layer[g.edge_index[0]] == g.node_layer[g.edge_index[1]]]
    assert intra.tolist() == [[0, 1], [1, 0]]
    # cross: neuron 3 (layer 1, j=0) -> i=1 (3.0), then the tie 0.5/0.5 goes to the smaller i=0; neuron 4 is zero
    assert g.edge_index[:, 2:].tolist() == [[3, 3], [1, 0]]
    assert g.edge_weight[2:].tolist() == [3.0, 0.5]
    assert g.node_features[:, 4].tolist() == [1, 1, 1, 1, 0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_neuron_and_all_dormant_layers(dtype):
    g = torch.Generator().manual_seed(1)
    w = [torch.randn(1, 3, 3, 3, generator=g), torch.zeros(4, 1, 3, 3), torch.randn(5, 4, generator=g),
         torch.randn(1, 5, generator=g)]
    w = [x.to(dtype) for x in w]
    for eps in EPS:
        for cross in (0, 2):
            got = neuron_graphs(w, eps=eps, dormant_quantile=0.1, cross_layer_topk=cross)
            assert_same(got, neuron_graphs_reference(w, eps, 0.1, cross))
            f = got.node_features
            assert f[0, 4] == 1 and f[1:5, 4].sum() == 0 and bool((f[1:5, :4] == 0).all())
            layer = got.node_layer[got.edge_index]
            assert not bool(((layer == 0) & (layer[[1, 0]] == 0)).any())  # one neuron: no intra edge
            assert not bool((layer[0] == 1).any())  # all-zero layer: no edge starts there


@pytest.mark.parametrize("dtype", DTYPES)
def test_duplicate_rows_linked_at_eps_one(dtype):
    g = torch.Generator().manual_seed(2)
    w = torch.rand(6, 4, 3, 3, generator=g) + 0.1
    w[4] = w[1]
    w[5] = -w[1]  # same |W|, so the same q
    got = neuron_graphs([w.to(dtype)], eps=1.0, dormant_quantile=0.0)
    assert_same(got, neuron_graphs_reference([w.to(dtype)], 1.0, 0.0, 0))
    assert got.edge_index.tolist() == [[1, 1, 4, 4, 5, 5], [4, 5, 1, 5, 1, 4]]
    torch.testing.assert_close(got.edge_weight, torch.ones(6), rtol=1e-6, atol=0)


def test_quantile_zero_keeps_nonzero_and_one_keeps_only_the_strongest():
    w = torch.randn(8, 5, generator=torch.Generator().manual_seed(3))
    assert neuron_graphs([w], eps=-1.0, dormant_quantile=0.0).num_edges == 8 * 7
    top = neuron_graphs([w], eps=-1.0, dormant_quantile=1.0)
    assert top.num_edges == 0 and top.node_features[:, 4].sum() == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype):
    g = torch.Generator().manual_seed(4)
    w = [
        torch.randn(3, 6, 3, 3, generator=g).to(dtype).transpose(0, 1),  # [6, 3, 3, 3], transposed
        torch.randn(18, 6, 3, 5, generator=g).to(dtype)[::2, :, :, 1:4],  # [9, 6, 3, 3], sliced
        torch.randn(9, 7, generator=g).to(dtype).t(),  # [7, 9], transposed linear
        torch.randn(5, 7, 3, 3, generator=g).to(dtype).permute(0, 1, 3, 2),  # channels swapped kernel
    ]
    assert not any(x.is_contiguous() for x in w)
    for eps in (0.0, 0.5):
        got = neuron_graphs(w, eps=eps, dormant_quantile=0.1, cross_layer_topk=2)
        assert_same(got, neuron_graphs_reference(w, eps, 0.1, 2))
        assert_same(got, neuron_graphs([x.contiguous() for x in w], eps, 0.1, 2))


def test_deterministic_across_thread_counts():
    w = [torch.randn(96, 64, 3, 3), torch.randn(128, 96, 3, 3), torch.randn(10, 128)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = neuron_graphs(w, 0.5, 0.05, 3)
        torch.set_num_threads(max(2, threads))
        many = neuron_graphs(w, 0.5, 0.05, 3)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


OP_ERRORS = [
    (lambda: [], 0.5, 0.05, 0, r"empty list"),
    (lambda: [torch.randn(3, 2), torch.randn(4, 3).half()], 0.5, 0.05, 0, r"mixed dtypes: layer 1"),
    (lambda: [torch.randn(3, 2), torch.randn(4, 3, 2)], 0.5, 0.05, 0, r"layer 1 weight must be 2-D .* got 3-D"),
    (lambda: [torch.randn(3, 2, 3, 3, 1)], 0.5, 0.05, 0, r"layer 0 weight must be 2-D .* got 5-D"),
    (lambda: [torch.randn(3, 2), torch.randn(4, 3), torch.tensor([[1.0, float("nan")]])], 0.5, 0.05, 0,
     r"layer 2 weight contains NaN or inf"),
    (lambda: [torch.tensor([[1.0, float("inf")]], dtype=torch.bfloat16)], 0.5, 0.05, 0,
     r"layer 0 weight contains NaN or inf"),
    (lambda: [torch.randn(3, 2), torch.randn(0, 3)], 0.5, 0.05, 0, r"layer 1 has zero neurons"),
    (lambda: [torch.randn(3, 0, 3, 3)], 0.5, 0.05, 0, r"layer 0 weight is empty"),
    (lambda: [torch.randn(3, 2), torch.ones(3, 2, dtype=torch.int32)], 0.5, 0.05, 0, r"layer 1 has dtype Int"),
    (lambda: [torch.randn(3, 2).double()], 0.5, 0.05, 0, r"layer 0 has dtype Double"),
    (lambda: [torch.randn(3, 2)], 1.5, 0.05, 0, r"eps must be in \[-1, 1\], got 1.5"),
    (lambda: [torch.randn(3, 2)], -1.01, 0.05, 0, r"eps must be in \[-1, 1\]"),
    (lambda: [torch.randn(3, 2)], float("nan"), 0.05, 0, r"eps must be in \[-1, 1\], got nan"),
    (lambda: [torch.randn(3, 2)], 0.5, 1.2, 0, r"dormant_quantile must be in \[0, 1\], got 1.2"),
    (lambda: [torch.randn(3, 2)], 0.5, -0.1, 0, r"dormant_quantile must be in \[0, 1\]"),
    (lambda: [torch.randn(3, 2)], 0.5, 0.05, -1, r"cross_layer_topk must be >= 0, got -1"),
]


@pytest.mark.parametrize("make, eps, quantile, topk, match", OP_ERRORS)
def test_bad_inputs_raise_value_error_from_cpp(make, eps, quantile, topk, match):
    op = load_op()
    with pytest.raises(ValueError, match=match):
        op(make(), eps, quantile, topk)


def test_wrapper_raises_the_same_errors():
    with pytest.raises(ValueError, match=r"layer 1 weight must be 2-D"):
        neuron_graphs([torch.randn(3, 2), torch.randn(4, 3, 2)])


@CUDA
@pytest.mark.parametrize("cross", [0, 3])
@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype, kind, eps, cross):
    w = chain(kind, dtype)
    want = neuron_graphs(w, eps, 0.2, cross)
    got = neuron_graphs([x.cuda() for x in w], eps, 0.2, cross)
    assert all(t.device.type == "cuda" for t in got)
    assert_same([t.cpu() for t in got], want)


@CUDA
def test_cuda_special_layers_and_strides():
    g = torch.Generator().manual_seed(5)
    w = [torch.randn(1, 3, 3, 3, generator=g), torch.zeros(4, 1, 3, 3), torch.randn(5, 4, generator=g),
         torch.randn(9, 5, generator=g).t(), torch.randn(18, 9, 3, 5, generator=g)[::2, :, :, 1:4]]
    dup = torch.rand(6, 9, 3, 3, generator=g) + 0.1
    dup[4] = dup[1]
    w.append(dup)
    for dtype in DTYPES:
        for eps in EPS:
            x = [t.to(dtype) for t in w]
            want = neuron_graphs(x, eps, 0.1, 2)
            got = neuron_graphs([t.cuda() for t in x], eps, 0.1, 2)
            assert_same([t.cpu() for t in got], want)
    with pytest.raises(ValueError, match=r"layer 1 weight contains NaN or inf"):
        neuron_graphs([torch.randn(3, 2).cuda(), torch.tensor([[float("nan")] * 3]).cuda()])
    with pytest.raises(ValueError, match=r"mixed devices: layer 1 is on cpu"):
        load_op()([torch.randn(3, 2).cuda(), torch.randn(4, 3)], 0.5, 0.05, 0)
    big = [torch.randn(512, 256, 3, 3).cuda(), torch.randn(512, 512, 3, 3).cuda(), torch.randn(10, 512).cuda()]
    assert_same([t.cpu() for t in neuron_graphs(big, 0.5, 0.05, 3)],
                neuron_graphs([t.cpu() for t in big], 0.5, 0.05, 3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_in_thresholds_and_topk(dtype):
    g = torch.Generator().manual_seed(6)
    w = [torch.randint(-2, 3, s, generator=g).to(dtype) for s in [(12, 5, 3, 3), (9, 12, 1, 1), (7, 9)]]
    for eps in EPS:
        for cross in (1, 3, 20):
            assert_same(neuron_graphs(w, eps, 0.3, cross), neuron_graphs_reference(w, eps, 0.3, cross))
