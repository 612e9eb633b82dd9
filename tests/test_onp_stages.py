"""ONP's stages on hand-built models with PLANTED signals: every test says what is planted and what must be found.

Each test also runs once WITHOUT its planted signal, as a `pytest.param(..., marks=xfail(strict=True))`: that run
must fail (an XPASS is an error), which proves the assertion depends on the plant and not on luck or a
tautology. `pytest --runxfail tests/test_onp_stages.py` shows the failing assertions of those runs.

Stages covered: exposure features (trigger_shift), graph construction (neuron_graphs edges and weights),
PPO on a synthetic reward, PPO on the real reward (MaskScorer with a trigger proxy), the depth rule.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn

from onp_fast.defenses.onp import (FEATURE_NAMES, PolicyGraph, PPOConfig, PrunePolicy, build_policy_graph,
                                   exposure_features, train_policy)
from onp_fast.groups import find_groups
from onp_fast.prepare import TriggerProxy, unlearn
from onp_fast.repair.select import choose_depth
from onp_fast.reward import MaskScorer, RewardWeights

pytestmark = pytest.mark.usefixtures("one_thread")

PLANT = pytest.mark.parametrize(
    "plant", [pytest.param(True, id="planted"),
              pytest.param(False, id="no-plant", marks=pytest.mark.xfail(strict=True, reason="nothing planted"))])

# --------------------------------------------------------------------------------------------------------------
# 1. A planted backdoor unit.
#
# Input 1x8x8, 4 classes, each a texture: 0 horizontal stripes, 1 vertical stripes, 2 checkerboard, 3 flat bright.
# conv "0" (6 channels, 3x3, no padding): channels 0-3 are separable detectors d(x)s, s(x)d, d(x)d, s(x)s with
# d = [-1, 2, -1] (alternation) and s = [1, 2, 1] (smoothing): each responds to its own texture only; channel 3
# (s(x)s / 16) is a local-brightness meter. Channels 4, 5: weak random fillers.
# conv "3" (6 channels, 3x3, padding 1): channels 0-3 copy conv-0 channels 0-3 (centre tap); channel 5: filler.
# Channel 4 = B, THE PLANT: BN2 output 10 * brightness - 20, i.e. it fires only where the local brightness
# exceeds 2, which no clean image reaches (flat images have brightness ~1) but a 3x3 patch of value 4 in the
# top-left corner does. The linear head reads class c from channel c (weight 4) and B -> class 0 (weight 10).
# plant=False: B's conv weights and its logit weight are zero (same architecture, same group indices).
# --------------------------------------------------------------------------------------------------------------
TARGET = 0  # the backdoor's target class
B_LAYER, B_ROW = "3", 4  # the planted unit: output row 4 of the second conv
PATCH = 4.0  # the trigger: a 3x3 patch of this value in the top-left corner
_D = torch.tensor([-1.0, 2.0, -1.0])
_S = torch.tensor([1.0, 2.0, 1.0])


def planted_model(plant: bool = True) -> nn.Module:
    """The hand-built classifier above (eval mode); plant=False leaves unit B dead and unconnected."""
    m = nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
                      nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    g = torch.Generator().manual_seed(0)
    conv1, bn1, conv2, bn2, fc = m[0], m[1], m[3], m[4], m[8]
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for c, f in enumerate([torch.outer(_D, _S), torch.outer(_S, _D), torch.outer(_D, _D), torch.outer(_S, _S)]):
            conv1.weight[c, 0] = f
        conv1.weight[4:, 0] = torch.randn(2, 3, 3, generator=g) * 0.3
        bn1.weight.copy_(torch.tensor([1 / 8, 1 / 8, 1 / 8, 1 / 16, 0.1, 0.1]))  # stripes -> ~1, brightness -> pixel
        for c in range(4):
            conv2.weight[c, c, 1, 1] = 1.0
        conv2.weight[5] = torch.randn(6, 3, 3, generator=g) * 0.05
        bn2.weight.fill_(1.0)
        bn2.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, -20.0, -0.5]))
        for c in range(4):
            fc.weight[c, c] = 4.0
        if plant:
            conv2.weight[B_ROW, 3, 1, 1] = 10.0  # B = 10 * brightness - 20 (before the ReLU)
            fc.weight[TARGET, B_ROW] = 10.0  # ... and B votes hard for the target class
        for bn in (bn1, bn2):
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
            bn.eps = 0.0
    return m.eval()


def make_data(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean images [4n, 1, 8, 8] of the four textures (random amplitude, phase and noise), labels [4n]."""
    g = torch.Generator().manual_seed(seed)
    alt = (-1.0) ** torch.arange(8)
    templates = [alt.view(8, 1).expand(8, 8), alt.view(1, 8).expand(8, 8), torch.outer(alt, alt), torch.ones(8, 8)]
    xs, ys = [], []
    for c, t in enumerate(templates):
        amp = 0.8 + 0.4 * torch.rand(n_per_class, 1, 1, generator=g)
        phase = torch.where(torch.rand(n_per_class, 1, 1, generator=g) < 0.5, -1.0, 1.0) if c < 3 else 1.0
        xs.append((t * amp * phase + 0.2 * torch.randn(n_per_class, 8, 8, generator=g)).unsqueeze(1))
        ys.append(torch.full((n_per_class,), c))
    return torch.cat(xs), torch.cat(ys)


def patch_proxy() -> TriggerProxy:
    """The known trigger as a TriggerProxy (instead of a synthesised one): a PATCH-valued 3x3 top-left square."""
    mask = torch.zeros(1, 8, 8)
    mask[:, :3, :3] = 1.0
    return TriggerProxy(mask=mask, pattern=PATCH * mask.clone(), target=TARGET, norms=torch.ones(4),
                        anomaly_index=10.0)


def b_group(groups) -> int:
    return int(groups.layer_groups[B_LAYER][B_ROW])


@torch.no_grad()
def attack_success(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of stamped non-target images classified as the target."""
    other = y != TARGET
    return float((model(patch_proxy().apply(x[other])).argmax(1) == TARGET).float().mean())


@torch.no_grad()
def clean_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


REWARD = RewardWeights(ca_b=1.0, ca_t=1.0, ca_u=0.0, ca_p=0.0, sparsity=0.1)  # the default weights


@functools.lru_cache(maxsize=None)
def _stages(plant: bool):
    """Groups, exposure features, policy graph and the policy trained (PPO, 40 x 16 masks) on the real reward
    (CA_B + CA_T with the patch proxy - 0.1 sparsity) for planted_model(plant). Cached: shared by tests."""
    model = planted_model(plant)
    x, y = make_data(16, seed=0)
    proxy = patch_proxy()
    groups = find_groups(model, (1, 8, 8))
    unlearned, _ = unlearn(model, x, y)
    feats = exposure_features(model, unlearned, groups, x, y, seed=0, trigger=proxy)
    graph = build_policy_graph(model, groups, feats, eps=0.9, cross_layer_topk=2)
    torch.manual_seed(0)
    policy = PrunePolicy(graph.x.shape[1], graph.group_features.shape[1], init_prune_prob=0.02)
    hist = train_policy(policy, graph, MaskScorer(groups, model, x, y, REWARD, trigger=proxy),
                        PPOConfig(iterations=40, samples=16, seed=0))
    with torch.no_grad():
        prob = torch.sigmoid(policy(graph))
    return model, groups, feats, prob, hist


@pytest.mark.parametrize("plant, asr", [(True, 1.0), (False, 0.0)], ids=["planted", "no-plant"])
def test_planted_model_is_what_it_claims(plant, asr):
    """Sanity of the fixture itself: both variants classify clean textures perfectly; the patch sends every
    non-target image to the target only when B is planted; B never fires on clean images."""
    model = planted_model(plant)
    x, y = make_data(16, seed=5)
    assert clean_accuracy(model, x, y) == 1.0
    assert attack_success(model, x, y) == asr
    b_act = []
    h = model[5].register_forward_hook(lambda m, i, o: b_act.append(o[:, B_ROW]))  # B after its ReLU
    with torch.no_grad():
        model(x)
    h.remove()
    assert float(b_act[0].abs().max()) == 0.0


@PLANT
def test_trigger_shift_ranks_the_planted_unit_first(plant):
    """Planted: unit B fires only on the patch. Must find: with the patch as TriggerProxy, B's group has the
    largest "trigger_shift" exposure feature of all groups (by a clear margin)."""
    _, groups, feats, _, _ = _stages(plant)
    shift = feats[:, FEATURE_NAMES.index("trigger_shift")]
    b = b_group(groups)
    assert int(shift.argmax()) == b, f"trigger_shift ranks group {int(shift.argmax())} first, not B ({b}): {shift}"
    others = torch.cat([shift[:b], shift[b + 1:]])
    assert float(shift[b]) > 3 * float(others.abs().max())


@PLANT
def test_policy_trained_on_reward_prunes_the_planted_unit(plant):
    """Planted: B carries the backdoor, so pruning it raises CA_T (patched images regain their true label)
    without costing CA_B. Must find: after 40 PPO iterations on the real reward (ca_b=1, ca_t=1, sparsity 0.1,
    the patch as trigger proxy) B's prune probability is the highest of all groups and above 0.5 (so above
    the median). Without the plant B is one of four no-effect units (B and three fillers), all pushed down by
    the sparsity term: it lands mid-pack, so the median check alone would not discriminate; argmax and 0.5 do."""
    _, groups, _, prob, hist = _stages(plant)
    b = b_group(groups)
    assert int(prob.argmax()) == b and float(prob[b]) > 0.5, f"B ({b}) at {float(prob[b]):.3g}: {prob}"
    assert float(prob[b]) > float(prob.median())
    assert hist["reward_mean"][-1] > hist["reward_mean"][0]


@PLANT
def test_depth_rule_on_trained_probabilities_prunes_the_backdoor(plant):
    """Planted: B. Must find: choose_depth (one-SE rule, CA_B tolerance 0.02) over the trained policy's ranking,
    scored on held-out clean images, prunes B's group; the model pruned with that mask (groups.prune_) no
    longer sends patched images to the target and keeps its clean accuracy."""
    model, groups, _, prob, _ = _stages(plant)
    xv, yv = make_data(16, seed=1)
    choice = choose_depth(prob, MaskScorer(groups, model, xv, yv, REWARD, trigger=patch_proxy()))
    b = b_group(groups)
    assert bool(choice["prune"][b]), f"depth {choice['depth']} prunes {choice['prune'].nonzero().flatten().tolist()}"
    assert choice["depth"] <= 2
    xt, yt = make_data(16, seed=2)
    before = attack_success(model, xt, yt)
    pruned = groups.prune_(planted_model(plant), ~choice["prune"])
    assert before == 1.0 and attack_success(pruned, xt, yt) == 0.0
    assert clean_accuracy(pruned, xt, yt) == 1.0


@PLANT
def test_depth_rule_on_trigger_shift_ranking_prunes_the_backdoor(plant):
    """Planted: B. Must find: the depth rule over the raw trigger_shift ranking (no policy) also stops at a
    depth that prunes B, and the pruned model is no longer backdoored."""
    model, groups, feats, _, _ = _stages(plant)
    xv, yv = make_data(16, seed=1)
    shift = feats[:, FEATURE_NAMES.index("trigger_shift")]
    choice = choose_depth(shift, MaskScorer(groups, model, xv, yv, REWARD, trigger=patch_proxy()))
    assert bool(choice["prune"][b_group(groups)]), f"depth {choice['depth']}"
    xt, yt = make_data(16, seed=2)
    pruned = groups.prune_(planted_model(plant), ~choice["prune"])
    assert attack_success(pruned, xt, yt) == 0.0 and clean_accuracy(pruned, xt, yt) == 1.0


# --------------------------------------------------------------------------------------------------------------
# 2. Graph construction with known weights.
#
# Every kernel slice is q[i, c] * U with U a fixed signed 3x3 pattern with sum |U| = 1, so the connection
# strength (L1 of each input-channel slice) of neuron i is exactly the row q[i] written below.
# --------------------------------------------------------------------------------------------------------------
_U = torch.tensor([[1.0, -2.0, 0.0], [0.0, 3.0, -1.0], [2.0, 0.0, -1.0]]) / 10
Q1 = [[2.0, 1.0, 0.0],  # n0
      [4.0, 2.0, 0.0],  # n1 = 2 n0: parallel -> cosine 1 (the PLANT of this test)
      [0.0, 0.0, 5.0],  # n2 orthogonal to all others -> no intra edge
      [0.0, 0.0, 0.0],  # n3 dead -> dormant, no edge at all (no conv-2 row reads it either)
      [3.0, 0.0, 1.0],  # n4: cos(n0, n4) = 6 / sqrt(50) = 0.849 < eps -> no edge
      [2.0, 1.0, 0.5]]  # n5: cos(n0, n5) = cos(n1, n5) = 5 / sqrt(26.25) = 0.976 >= eps
Q1_NOT_PARALLEL = [0.0, 2.0, 4.0]  # n1 rotated: cosines 0.2 (n0), 0.894 (n2), 0.390 (n5): all below eps
Q2 = [[5.0, 0.0, 1.0, 0.0, 3.0, 0.0],  # m0: top-2 inputs n0 (5), n4 (3)
      [0.0, 9.0, 0.0, 0.0, 0.0, 0.0],  # m1: one positive input -> one cross edge only (n1, 9)
      [2.0, 4.0, 2.0, 0.0, 1.0, 0.0]]  # m2: n1 (4), then the tie n0/n2 at 2 goes to the smaller index n0
# conv-2 rows all have L1 9 (a tie at the minimum: none is dormant); their cosines are 0, 0.507, 0.8 < eps.
W3 = [[3.0, -1.0, 2.0],  # r0: |.| = (3, 1, 2): top-2 m0 (3), m2 (2)
      [2.0, 2.0, -2.0]]  # r1: |.| = (2, 2, 2): ties -> m0, m1; cos(r0, r1) = 12 / sqrt(168) = 0.926; both L1 6


def graph_model(parallel: bool = True) -> nn.Module:
    q1 = torch.tensor(Q1)
    if not parallel:
        q1[1] = torch.tensor(Q1_NOT_PARALLEL)
    m = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 3, 3), nn.BatchNorm2d(3),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    with torch.no_grad():
        m[0].weight.copy_(q1[:, :, None, None] * _U)
        m[3].weight.copy_(torch.tensor(Q2)[:, :, None, None] * _U)
        m[8].weight.copy_(torch.tensor(W3))
    return m.eval()


@pytest.mark.parametrize("parallel", [
    pytest.param(True, id="planted"),
    pytest.param(False, id="n1-not-parallel", marks=pytest.mark.xfail(strict=True, reason="plant removed"))])
def test_policy_graph_edges_match_hand_computation(parallel):
    """Planted: conv-1 neurons n0 || n1 (and n5 nearly parallel to both), n2 orthogonal, n3 dead, n4 at cosine
    0.849; conv-2 rows with known top-2 inputs (one with a single input, one with a tie); a linear head whose
    two rows have cosine 0.926. Must find, with eps=0.9 and cross_layer_topk=2: exactly the intra edges
    n0-n1 (1.0), n0-n5 and n1-n5 (0.976) both ways and r0-r1 (0.926) both ways, the cross edges with weights
    ||W_{l+1}[j, i]||_1, no edge touching n2 or n3, and n3 marked dormant. Without the plant (n1 rotated away
    from n0) the edge set differs and the test fails."""
    model = graph_model(parallel)
    groups = find_groups(model, (3, 8, 8))
    assert groups.layers == ["0", "3", "8"]
    feats = torch.randn(groups.num_groups, 4, generator=torch.Generator().manual_seed(0))
    g = build_policy_graph(model, groups, feats, eps=0.9, cross_layer_topk=2)
    # node ids: conv "0" rows 0-5, conv "3" rows 6-8, linear "8" rows 9-10 (the logits: no group)
    assert g.node_layer.tolist() == [0] * 6 + [1] * 3 + [2] * 2
    assert g.node_group.tolist() == list(range(9)) + [-1, -1]
    c05 = 5 / 26.25 ** 0.5
    c_r = 12 / 168 ** 0.5
    expected = {
        (0, 1): 1.0, (1, 0): 1.0, (0, 5): c05, (5, 0): c05, (1, 5): c05, (5, 1): c05,  # conv 0, intra
        (9, 10): c_r, (10, 9): c_r,  # linear, intra
        (6, 0): 5.0, (6, 4): 3.0, (7, 1): 9.0, (8, 1): 4.0, (8, 0): 2.0,  # conv 3 -> conv 0
        (9, 6): 3.0, (9, 8): 2.0, (10, 6): 2.0, (10, 7): 2.0,  # linear -> conv 3
    }
    got = {(int(s), int(d)): float(w) for (s, d), w in zip(g.edge_index.t(), g.edge_weight)}
    assert g.edge_index.shape[1] == len(got), "duplicate edges"
    assert sorted(got) == sorted(expected)
    for e, w in expected.items():
        assert got[e] == pytest.approx(w, rel=1e-5), e
    touched = set(g.edge_index.flatten().tolist())
    assert 2 not in touched and 3 not in touched
    # node features: the op's [l1, mean, max, std, active] go through log1p and per-layer standardisation; the
    # dormant flag survives as the only conv-0 node below the others in column 4
    active = g.x[:6, 4]
    assert int(active.argmin()) == 3 and bool((active[[0, 1, 2, 4, 5]] == active[0]).all())


# --------------------------------------------------------------------------------------------------------------
# 3. PPO on a synthetic reward.
# --------------------------------------------------------------------------------------------------------------
G_SYN = 12
S_SYN = [1, 5, 9]  # the planted set of groups worth pruning


def synthetic_graph() -> PolicyGraph:
    """24 nodes (two layers of 12, node i in group i % 12), random features and edges, seeded."""
    g = torch.Generator().manual_seed(0)
    n = 2 * G_SYN
    src, dst = torch.randint(0, n, (40,), generator=g), torch.randint(0, n, (40,), generator=g)
    keep = src != dst
    ei = torch.stack([src[keep], dst[keep]])
    ei = torch.cat([ei, ei.flip(0)], dim=1)
    return PolicyGraph(x=torch.randn(n, 6, generator=g), edge_index=ei,
                       edge_weight=torch.rand(ei.shape[1], generator=g), node_group=torch.arange(n) % G_SYN,
                       node_layer=(torch.arange(n) >= G_SYN).long(),
                       group_features=torch.randn(G_SYN, 5, generator=g), num_groups=G_SYN)


def reward_on_s():
    """reward(prune [K, G]) = |prune & S| - |prune \\ S| per mask."""
    in_s = torch.zeros(G_SYN, dtype=torch.bool)
    in_s[S_SYN] = True
    return lambda prune: (prune & in_s).sum(1).float() - (prune & ~in_s).sum(1).float()


def reward_ignoring_s():
    """The control: seeded noise, independent of the mask (nothing to learn)."""
    g = torch.Generator().manual_seed(1)
    return lambda prune: torch.randn(len(prune), generator=g)


@pytest.mark.parametrize("make_reward", [
    pytest.param(reward_on_s, id="planted"),
    pytest.param(reward_ignoring_s, id="reward-ignores-S", marks=pytest.mark.xfail(strict=True, reason="no signal"))])
def test_ppo_learns_the_planted_set(make_reward):
    """Planted: reward(prune) = |prune & S| - |prune \\ S| with S = {1, 5, 9} of 12 groups. Must find: starting
    from prune probability 0.5 everywhere, PPO (80 iterations, K=16) ends with prune probability > 0.8 on S and
    < 0.2 elsewhere. With a reward that ignores S (noise) it must not."""
    graph = synthetic_graph()
    torch.manual_seed(0)
    policy = PrunePolicy(graph.x.shape[1], graph.group_features.shape[1], init_prune_prob=0.5)
    train_policy(policy, graph, make_reward(), PPOConfig(iterations=80, samples=16, seed=0))
    with torch.no_grad():
        prob = torch.sigmoid(policy(graph))
    in_s = torch.zeros(G_SYN, dtype=torch.bool)
    in_s[S_SYN] = True
    assert float(prob[in_s].min()) > 0.8, prob
    assert float(prob[~in_s].max()) < 0.2, prob
