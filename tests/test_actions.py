"""ONP's action space on large models (defenses/onp/screen.py): above ONPConfig.actions groups the policy decides
only the groups the exposure features single out. Planted signals: a group each suspicion feature ranks first
within its own layer must be picked; PPO learns a planted set inside the actions and never prunes outside."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from onp_fast import models
from onp_fast.cli import main
from onp_fast.defenses import ONPConfig
from onp_fast.defenses.onp import FEATURE_NAMES, PolicyGraph, PPOConfig, PrunePolicy, train_policy
from onp_fast.defenses.onp.screen import SUSPICION, home_layers, screen_actions
from onp_fast.errors import UserError
from onp_fast.io import save_model
from onp_fast.repair import RepairConfig, repair

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS, PER_LAYER = 4, 30
G = LAYERS * PER_LAYER


def layered_graph(num_groups: int = G, heads: int = 0) -> PolicyGraph:
    """Groups 0..G-1 with one node each, PER_LAYER per layer in order; `heads` more groups without nodes; random
    node and group features and a ring of edges within each layer."""
    g = torch.Generator().manual_seed(0)
    n = num_groups
    src = torch.arange(n)
    dst = torch.where((src + 1) % PER_LAYER == 0, src + 1 - PER_LAYER, src + 1)
    ei = torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])
    return PolicyGraph(x=torch.randn(n, 6, generator=g), edge_index=ei, edge_weight=torch.ones(ei.shape[1]),
                       node_group=torch.arange(n), node_layer=torch.arange(n) // PER_LAYER,
                       group_features=torch.randn(n + heads, 5, generator=g), num_groups=n + heads)


def layered_features(plant: bool) -> tuple[torch.Tensor, dict[str, int]]:
    """[G, F] features: every suspicion feature is noise whose scale grows 100x per layer (so the largest raw
    values are all in the last layer); planted: in layer 0 (the smallest scale) one group per suspicion feature
    stands 6 of its layer's standard deviations out, in that feature only. -> (features, {feature: group})."""
    g = torch.Generator().manual_seed(1)
    feats = torch.rand(G, len(FEATURE_NAMES), generator=g)
    scale = 100.0 ** (torch.arange(G) // PER_LAYER).double()
    planted = {}
    for i, name in enumerate(SUSPICION):
        col = FEATURE_NAMES.index(name)
        f = (1 + 0.1 * torch.randn(G, generator=g, dtype=torch.double)) * scale
        if plant:
            f[3 + 5 * i] = 1.6  # layer 0: mean 1, std 0.1
        feats[:, col] = f.float()
        planted[name] = 3 + 5 * i
    return feats, planted


@pytest.mark.parametrize("plant", [pytest.param(True, id="planted"),
                                   pytest.param(False, id="no-plant",
                                                marks=pytest.mark.xfail(strict=True, reason="nothing planted"))])
def test_the_screen_picks_what_any_suspicion_feature_ranks_first_in_its_layer(plant):
    """Planted: four groups of the quietest layer, each an outlier in one suspicion feature only, while the raw
    values of every other layer are 100-10^6 times larger. Must find: with 8 actions of 120 groups all four are
    picked (a global ranking of the raw values would pick none: they are the last layer's)."""
    feats, planted = layered_features(plant)
    actions = screen_actions(feats, layered_graph(), 8)
    assert len(actions) == 8 and torch.equal(actions, torch.sort(actions).values)
    assert set(planted.values()) <= set(actions.tolist()), actions


def test_the_screen_keeps_every_group_under_the_cap_and_ignores_constant_features():
    feats, _ = layered_features(True)
    graph = layered_graph()
    assert torch.equal(screen_actions(feats, graph, G), torch.arange(G))
    assert torch.equal(screen_actions(feats, graph, 10 * G), torch.arange(G))
    # the trigger shift is 0 without a proxy: the picks come from the other three features' round robin
    feats[:, FEATURE_NAMES.index("trigger_shift")] = 0.0
    picked = set(screen_actions(feats, graph, 3).tolist())
    assert picked == {3, 8, 13}  # the planted groups of clp, noise_sensitivity and unlearn_change


def test_groups_without_nodes_form_their_own_segment():
    graph = layered_graph(heads=3)
    assert home_layers(graph).tolist() == (torch.arange(G) // PER_LAYER).tolist() + [LAYERS] * 3


S = [2, 7, 11]  # the planted set worth pruning, inside the actions


@pytest.mark.parametrize("planted", [pytest.param(True, id="planted"),
                                     pytest.param(False, id="reward-ignores-S",
                                                  marks=pytest.mark.xfail(strict=True, reason="no signal"))])
def test_ppo_over_the_actions_learns_the_planted_set_and_never_prunes_outside(planted):
    """Planted: reward = |prune & S| - |prune \\ S|, S = {2, 7, 11}, actions = the first 20 of 120 groups. Must
    find: every mask scored prunes nothing outside the actions; after 80 iterations (K=16, prune probability 0.5
    at the start) S is above 0.8 and the other actions under 0.2. With a noise reward it must not."""
    graph = layered_graph()
    actions = torch.arange(20)
    in_s = torch.zeros(G, dtype=torch.bool)
    in_s[S] = True
    seen = []
    noise = torch.Generator().manual_seed(1)

    def reward(prune):
        seen.append(prune.clone())
        assert prune.shape == (16, G)
        if planted:
            return (prune & in_s).sum(1).float() - (prune & ~in_s).sum(1).float()
        return torch.randn(len(prune), generator=noise)

    torch.manual_seed(0)
    policy = PrunePolicy(graph.x.shape[1], graph.group_features.shape[1], init_prune_prob=0.5)
    train_policy(policy, graph, reward, PPOConfig(iterations=80, samples=16, seed=0), actions=actions)
    assert not bool(torch.cat(seen)[:, 20:].any())
    with torch.no_grad():
        prob = torch.sigmoid(policy(graph))[actions]
    assert float(prob[S].min()) > 0.8, prob
    assert float(prob[[i for i in range(20) if i not in S]].max()) < 0.2, prob


def _tiny():
    torch.manual_seed(0)
    m = models.build("preactresnet18", num_classes=4, in_channels=1, width=0.125, input_size=8).eval()
    return m, torch.randn(24, 1, 8, 8), torch.arange(24) % 4


def test_repair_decides_only_the_screened_groups_and_never_prunes_the_rest():
    """A model of more groups than `actions`: only that many scores are finite, the screened ones, and the
    report says so; with actions=0 (every group) or a cap above the group count the scores are all finite."""
    m, x, y = _tiny()
    cfg = RepairConfig(reward_batch=32, perturbations=1, seed=0, purify="none")
    full = repair(m, x, y, 4, "onp", cfg, ONPConfig(iterations=2, samples=4, actions=0), progress=False)
    g = full.report["groups"]["count"]
    assert full.report["details"]["actions"] == {"decided": g, "groups": g, "screened": False}
    assert bool(torch.isfinite(full.scores).all())
    cut = repair(m, x, y, 4, "onp", cfg, ONPConfig(iterations=2, samples=4, actions=20), progress=False)
    assert cut.report["details"]["actions"] == {"decided": 20, "groups": g, "screened": True}
    finite = torch.isfinite(cut.scores)
    assert int(finite.sum()) == 20 == cut.report["candidates"]
    assert not bool(cut.prune[~finite].any())
    same = repair(m, x, y, 4, "onp", cfg, ONPConfig(iterations=2, samples=4, actions=g), progress=False)
    assert torch.equal(same.scores, full.scores)  # a cap the model does not reach changes nothing
    with pytest.raises(UserError, match="onp.actions"):
        repair(m, x, y, 4, "onp", cfg, ONPConfig(actions=-1), progress=False)


def test_cli_actions_is_onp_only(tmp_path):
    m, _, _ = _tiny()
    path = tmp_path / "m.pt"
    save_model(m, path)
    r = CliRunner().invoke(main, ["repair", str(path), "--dataset", "digits", "--method", "fp", "--actions", "8"])
    assert r.exit_code == 2 and "--actions set ONP's policy training" in r.output, r.output
    r = CliRunner().invoke(main, ["repair", str(path), "--dataset", "digits", "--actions", "-1"])
    assert r.exit_code == 2 and "--actions" in r.output
