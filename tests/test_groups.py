"""Neuron groups by fx tracing: structure on the zoo, a user-defined model, masks == pruned weights."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from onp_fast import models
from onp_fast.errors import UserError
from onp_fast.groups import find_groups


class UserNet(nn.Module):
    """A user's own architecture: two branches concatenated, a residual add, a post-act BN."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 10, 1)
        self.fc = nn.Linear(10, 5)

    def forward(self, x):
        y = self.bn(torch.cat([self.a(x), self.b(x)], dim=1))
        y = F.relu(y) + self.c(F.relu(y))
        return self.fc(y.mean(dim=(2, 3)))


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def test_preactresnet18_groups():
    m = models.build("preactresnet18", width=0.25)
    g = find_groups(m, (3, 32, 32))
    kinds = [x.kind for x in g.groups]
    planes = [16, 32, 64, 128]
    assert kinds.count("channel") == 2 * sum(planes)  # bn2 of each block
    assert kinds.count("coupled") == sum(planes)  # one residual stream per stage
    assert "linear" in g.layers and (g.layer_groups["linear"] == -1).all()  # logits are never pruned
    # a stage-1 stream channel is masked at the stem conv, every conv2 and every bn1 reading it
    stream = next(x for x in g.groups if x.kind == "coupled" and ("conv1", "out") in {(p.module, p.site) for p in x.points})
    mods = {p.module for p in stream.points}
    assert {"conv1", "layer1.0.bn1", "layer1.0.conv2", "layer1.1.bn1", "layer1.1.conv2", "layer2.0.bn1"} <= mods


def test_user_defined_model_concat_and_add():
    g = find_groups(UserNet(), (3, 8, 8))
    # concat of a (4) and b (6) feeds bn; the add ties bn's channels to c's: 10 coupled groups.
    assert g.num_groups == 10
    assert all(x.kind == "coupled" for x in g.groups)
    first = g.groups[g.layer_groups["a"][0]]
    assert {p.module for p in first.points} == {"a", "bn", "c"}  # a feeds a concat, not a norm: masked too
    assert g.layer_groups["a"].tolist() == g.layer_groups["c"][:4].tolist()
    assert g.layer_groups["b"].tolist() == g.layer_groups["c"][4:].tolist()


@pytest.mark.parametrize("name", ["preactresnet18", "resnet18", "vgg16_bn", "mobilenet_v2", "vit_small"])
def test_masking_equals_pruning_weights(name):
    torch.manual_seed(0)
    kw = {"width": 0.5, "depth": 2} if name.startswith("vit") else {"width": 0.25}
    m = _randomize_bn(models.build(name, **kw))
    g = find_groups(m, (3, 32, 32))
    keep = (torch.rand(g.num_groups, generator=torch.Generator().manual_seed(1)) > 0.3).float()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), g.masked(m, keep):
        masked = m(x)
    pruned = g.prune_(m, keep)
    with torch.no_grad():
        direct = pruned(x)
    torch.testing.assert_close(masked, direct, rtol=1e-5, atol=1e-5)


def test_pruned_coupled_channel_is_zero_everywhere():
    m = _randomize_bn(models.build("preactresnet18", width=0.25))
    g = find_groups(m, (3, 32, 32))
    stream = next(x for x in g.groups if x.kind == "coupled")
    keep = torch.ones(g.num_groups)
    keep[stream.index] = 0
    channel = stream.points[0].channel
    seen = {}
    hooks = [m.get_submodule(n).register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o))
             for n in ["layer1.0", "layer1.1"]]
    with torch.no_grad(), g.masked(m, keep):
        m(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    for out in seen.values():
        assert out[:, channel].abs().max() == 0


def test_no_prunable_neurons_and_untraceable():
    with pytest.raises(UserError, match="no prunable"):
        find_groups(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), (3, 2, 2))
    with pytest.raises(UserError, match="rejects inputs"):
        find_groups(models.build("preactresnet18", width=0.25), (1, 32, 32))


@pytest.mark.parametrize("name", ["preactresnet18", "resnet18", "vgg16_bn", "mobilenet_v2", "user"])
def test_compact_equals_masked_model(name):
    from onp_fast.groups import compact

    m = _randomize_bn(UserNet() if name == "user" else models.build(name, width=0.25))
    shape = (3, 8, 8) if name == "user" else (3, 32, 32)
    g = find_groups(m, shape)
    prune = torch.rand(g.num_groups, generator=torch.Generator().manual_seed(0)) < 0.3
    x = torch.randn(3, *shape)
    with torch.no_grad(), g.masked(m, (~prune).float()):
        ref = m(x)
    small = compact(m, g, prune)
    with torch.no_grad():
        out = small(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in m.parameters())
