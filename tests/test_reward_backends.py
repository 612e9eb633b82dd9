"""The reward on the engine against the hooked reference, for every kind of neuron group.

RewardEngine over GroupPoints (BN channels, coupled residual-stream groups at every member point, conv/linear
outputs no norm follows, LayerNorm/MLP units, attention heads) against `NeuronGroups.masked`; MaskScorer's
"engine" backend against its "hooks" backend on every reward term, on preactresnet18, resnet18, vgg16_bn,
mobilenet_v2 and vit_small at small widths.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from onp_fast.errors import UserError
from onp_fast.groups import find_groups
from onp_fast.models import build
from onp_fast.reward import GroupPoints, MaskScorer, RewardEngine, RewardWeights
from onp_fast.reward.scorer import SEQUENTIAL_Z

ARCHS = ["preactresnet18", "resnet18", "vgg16_bn", "mobilenet_v2", "vit_small"]
SIZE, B, CLASSES = 8, 6, 10
ALL_TERMS = RewardWeights(ca_b=1.0, ca_t=1.0, ca_u=0.5, ca_p=0.5, sparsity=0.1)


def small_model(arch: str, seed: int) -> nn.Module:
    """A small eval model with non-trivial norm statistics and affine parameters (fresh norms are identities)."""
    torch.manual_seed(seed)
    m = build(arch, width=0.34 if arch == "vit_small" else 0.125, input_size=SIZE).eval()
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            c = mod.num_features
            mod.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            mod.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        if isinstance(mod, (nn.BatchNorm2d, nn.LayerNorm)):
            c = mod.weight.shape[0]
            mod.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            mod.bias.data.copy_(torch.rand(c, generator=g) * 0.6 - 0.3)
    return m


class Stamp:
    """A trigger proxy stand-in: a bright 3x3 top-left patch, target class 0."""

    target = 0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[..., :3, :3] = 2.0
        return x


@pytest.fixture(scope="module", params=ARCHS)
def setup(request):
    arch = request.param
    model, unlearned = small_model(arch, 0), small_model(arch, 1)
    groups = find_groups(model, (3, SIZE, SIZE))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, 3, SIZE, SIZE, generator=g)
    y = torch.arange(B) % CLASSES
    return arch, model, unlearned, groups, x, y


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def kinds_of(groups, model) -> dict[str, torch.Tensor]:
    """{kind: [G] bool} for each group kind present, by the modules of its points: "bn" (BatchNorm output),
    "norm" (LayerNorm output), "point" (a conv/linear output no norm follows, e.g. an MLP hidden unit), "head"
    (an attention head's input slice), and "coupled" (tied by adds). A group can be of several kinds (a coupled
    group holds BN and conv points)."""
    named = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    for g in groups.groups:
        names = {g.kind} if g.kind == "coupled" else set()
        for p in g.points:
            mod = named[p.module]
            names.add("head" if p.site == "in" else "bn" if isinstance(mod, nn.BatchNorm2d) else
                      "norm" if isinstance(mod, nn.LayerNorm) else "point")
        for name in names:
            out.setdefault(name, torch.zeros(groups.num_groups, dtype=torch.bool))[g.index] = True
    return out


def hooked_logits(groups, model, keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """keep [K, G] -> [K, B, classes], one hooked forward per mask."""
    with torch.no_grad():
        out = []
        for k in keep:
            with groups.masked(model, k):
                out.append(model(x))
    return torch.stack(out)


def random_keep(groups, model, seed: int) -> torch.Tensor:
    """[K, G] keep factors: all kept; hard random; soft with exact zeros; perturbed (up to 1.4); and per group
    kind one mask pruning half of that kind's groups only."""
    g = torch.Generator().manual_seed(seed)
    G = groups.num_groups
    rows = [torch.ones(G), (torch.rand(G, generator=g) > 0.3).float()]
    soft = torch.rand(G, generator=g)
    rows.append(torch.where(soft < 0.2, torch.zeros_like(soft), soft))
    rows.append(0.6 + 0.8 * torch.rand(G, generator=g))
    for sel in kinds_of(groups, model).values():
        rows.append(torch.where(sel & (torch.rand(G, generator=g) < 0.5), 0.0, 1.0))
    return torch.stack(rows)


@pytest.mark.parametrize("strategy", ["sliced", "batched"])
def test_engine_masks_every_group_kind_like_the_hooks(setup, strategy):
    arch, model, _, groups, x, y = setup
    keep = random_keep(groups, model, 3)
    want = hooked_logits(groups, model, keep, x)
    eng = RewardEngine(model, GroupPoints(groups), strategy=strategy)
    got = eng.score(keep, x, y, return_logits=True)
    scale = float(want.abs().amax())
    torch.testing.assert_close(got.logits[0, 0], want, rtol=1e-5, atol=1e-5 * scale)
    assert torch.equal(got.correct[0, 0], (want.argmax(-1) == y).sum(1))
    probs = want.double().softmax(-1).gather(2, y.view(1, -1, 1).expand(len(keep), -1, 1)).squeeze(2).sum(1)
    torch.testing.assert_close(got.prob_sum[0, 0], probs, rtol=1e-5, atol=1e-6)


def test_every_kind_is_masked_and_changes_the_output(setup):
    """Planted: pruning the groups of one kind (alone) changes the logits, exactly as the hooks do; the engine
    masks each site kind at all (a site it skipped would leave the output unchanged)."""
    arch, model, _, groups, x, y = setup
    kinds = kinds_of(groups, model)
    expected = {"bn", "coupled"}
    if arch == "preactresnet18":
        expected |= {"point"}  # the residual convs feed the add, not a norm
    if arch == "vgg16_bn":
        expected = {"bn", "point"}  # a plain chain (nothing tied by an add); the classifier's hidden linears
    if arch == "vit_small":
        expected = {"norm", "point", "head", "coupled"}
    assert expected <= set(kinds), f"{arch}: kinds {sorted(kinds)}"
    eng = RewardEngine(model, GroupPoints(groups), strategy="batched")
    keep = torch.ones(1 + len(kinds), groups.num_groups)
    for i, sel in enumerate(kinds.values()):
        keep[1 + i, sel] = 0.0
    got = eng.score(keep, x, y, return_logits=True).logits[0, 0]
    want = hooked_logits(groups, model, keep, x)
    scale = float(want.abs().amax())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)
    for i, name in enumerate(kinds):
        assert (got[1 + i] - got[0]).abs().max() > 1e-4 * scale, f"{arch}: pruning the {name} groups changed nothing"


@pytest.mark.parametrize("strategy", ["sliced", "batched"])
def test_scorer_backends_agree_on_every_term(setup, strategy):
    arch, model, unlearned, groups, x, y = setup
    g = torch.Generator().manual_seed(4)
    perts = 1 + (torch.rand(2, groups.num_groups, generator=g) * 2 - 1) * 0.4
    prune = random_keep(groups, model, 5) < 0.5  # the hard rows: none, random, per-kind
    prune[3] = torch.rand(groups.num_groups, generator=g) < 0.1
    kw = dict(unlearned=unlearned, perturbations=perts, trigger=Stamp())
    hooks = MaskScorer(groups, model, x, y, ALL_TERMS, backend="hooks", **kw)
    engine = MaskScorer(groups, model, x, y, ALL_TERMS, backend="engine", strategy=strategy, **kw)
    want, got = hooks.terms(prune), engine.terms(prune)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=f"{arch} {name}")
    assert len(hooks.x_t) > 0 and float(want["ca_t"].std()) > 0  # CA_T is on and varies with the mask
    torch.testing.assert_close(engine(prune), hooks(prune), rtol=0, atol=1e-5)


def test_scorer_rejects_an_unknown_backend(setup):
    _, model, _, groups, x, y = setup
    with pytest.raises(UserError, match="reward backend"):
        MaskScorer(groups, model, x, y, ALL_TERMS, backend="fast")


def test_engine_parts_equal_separate_calls(setup):
    _, model, _, groups, x, y = setup
    keep = random_keep(groups, model, 6)
    eng = RewardEngine(model, GroupPoints(groups), strategy="batched")
    a, b, empty = eng.score_parts(keep, [(x[:2], y[:2]), (x[2:], y[2:]), (x[:0], y[:0])])
    for part, (xi, yi) in ((a, (x[:2], y[:2])), (b, (x[2:], y[2:]))):
        whole = eng.score(keep, xi, yi)
        assert torch.equal(part.correct, whole.correct) and torch.equal(part.class_counts, whole.class_counts)
        torch.testing.assert_close(part.prob_sum, whole.prob_sum, rtol=1e-6, atol=1e-9)
    assert int(empty.correct.sum()) == 0 and float(empty.prob_sum.abs().sum()) == 0
    with pytest.raises(UserError, match="perturbations"):
        from onp_fast.reward import Perturbations
        eng.score(keep, x, y, Perturbations.random(1, groups.num_groups))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_cuda_masks_every_group_kind(setup):
    arch, model, _, groups, x, y = setup
    keep = random_keep(groups, model, 7)
    want = hooked_logits(groups, model, keep, x)
    gpu = copy.deepcopy(model).cuda()
    got = RewardEngine(gpu, GroupPoints(groups)).score(keep.cuda(), x.cuda(), y.cuda(), return_logits=True)
    scale = float(want.abs().amax())
    torch.testing.assert_close(got.logits[0, 0], want, rtol=1e-4, atol=1e-4 * scale)


@pytest.fixture(scope="module")
def labelled_by_itself():
    """preactresnet18 at a small width with 128 random images labelled by its own argmax: CA_B 1.0 unmasked."""
    model = small_model("preactresnet18", 0)
    groups = find_groups(model, (3, SIZE, SIZE))
    x = torch.randn(128, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, groups, x, y


def graded_prunes(groups) -> torch.Tensor:
    """[8, G] bool: nothing, then 1, 1, 1, 2, 4, 36 and 324 random groups pruned (this random model loses from
    none to all of its accuracy to a single group)."""
    g = torch.Generator().manual_seed(8)
    out = torch.zeros(8, groups.num_groups, dtype=torch.bool)
    for row, k in enumerate((0, 1, 1, 1, 2, 4, 36, 324)):
        out[row, torch.randperm(groups.num_groups, generator=g)[:k]] = True
    return out


@pytest.mark.parametrize("backend", ["engine", "hooks"])
def test_sequential_test_stops_only_masks_clearly_under_the_floor_and_scores_the_rest_in_full(
        labelled_by_itself, backend):
    model, groups, x, y = labelled_by_itself
    prune = graded_prunes(groups)
    weights = RewardWeights(ca_b=1.0, ca_t=1.0, sparsity=0.1)
    full = MaskScorer(groups, model, x, y, weights, trigger=Stamp(), backend=backend)
    seq = MaskScorer(groups, model, x, y, weights, trigger=Stamp(), backend=backend, sequential=0.25,
                     tolerance=0.02)
    want, got = full.terms(prune), seq.terms(prune)
    assert seq.floor() == pytest.approx(0.98)  # labels are the model's own: CA_B 1.0 unmasked
    n1, n1_t = seq._first_look()
    assert (n1, n1_t) == (32, math.ceil(0.25 * len(seq.x_t)))
    # the first look on its own, by hooks: which masks are clearly (three standard errors) under 0.98 there
    first = MaskScorer(groups, model, x[:n1], y[:n1], weights, trigger=None, backend="hooks").terms(prune)["ca_b"]
    p, z = first.double(), SEQUENTIAL_Z
    upper = (p + z * z / (2 * n1) + z * torch.sqrt(p * (1 - p) / n1 + z * z / (4 * n1 * n1))) / (1 + z * z / n1)
    stopped = upper < 0.98
    assert 0 < int(stopped.sum()) < len(prune) - 1 and not stopped[0]  # the planted grades: some stop, some go on
    assert (want["ca_b"][stopped] < 0.9).all()  # every stopped mask is far under the tolerance on all images
    torch.testing.assert_close(got["ca_b"][stopped], first[stopped], rtol=0, atol=1e-6)
    for name in ("ca_b", "ca_t", "sparsity"):  # the masks that go on are scored exactly as without the test
        torch.testing.assert_close(got[name][~stopped], want[name][~stopped], rtol=0, atol=1e-5, msg=name)
    stamped = len(seq.x_t)
    assert seq.scored["stopped"] == int(stopped.sum())
    assert full.scored["images"] - seq.scored["images"] == int(stopped.sum()) * (128 - n1 + stamped - n1_t)
    one = seq.terms(prune[-1:])  # a single mask (the depth rule's standard error, a bench call) is never stopped
    torch.testing.assert_close(one["ca_b"], want["ca_b"][-1:], rtol=0, atol=1e-6)


def test_sequential_test_is_off_by_default_and_refuses_a_share_outside_0_1(labelled_by_itself):
    model, groups, x, y = labelled_by_itself
    scorer = MaskScorer(groups, model, x, y, RewardWeights())
    scorer.terms(graded_prunes(groups))
    assert scorer.scored["stopped"] == 0
    for bad in (-0.1, 1.0):
        with pytest.raises(UserError, match="first look"):
            MaskScorer(groups, model, x, y, RewardWeights(), sequential=bad)
