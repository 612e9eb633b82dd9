"""RewardEngine against the per-mask loop (and the naive K*B batch): preactresnet18, resnet18, vgg16_bn at
small widths, hard and soft masks, K in {1, 7, 32}, with and without perturbations, two models at once."""
from __future__ import annotations

import pytest
import torch

from onp_fast.errors import UserError
from onp_fast.models import build
from onp_fast.reward.reference import loop_reference, naive_batch_reference
from onp_fast.reward import (NeuronSet, NeuronUnit, Perturbations, RewardEngine, bn_neurons, expand_groups,
                             parse_memory)

ARCHS = ["preactresnet18", "resnet18", "vgg16_bn"]
SIZE, B = 8, 4


def model(arch: str, seed: int) -> torch.nn.Module:
    """A small model with non-trivial BN statistics (fresh BNs are identities)."""
    torch.manual_seed(seed)
    m = build(arch, width=0.125, input_size=SIZE)
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            c = mod.num_features
            mod.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            mod.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            mod.bias.data.copy_(torch.rand(c, generator=g) * 0.6 - 0.3)
    return m


@pytest.fixture(scope="module", params=ARCHS)
def setup(request):
    models = [model(request.param, 0), model(request.param, 1)]
    g = torch.Generator().manual_seed(2)
    images = torch.randn(B, 3, SIZE, SIZE, generator=g)
    labels = torch.randint(0, 10, (B,), generator=g)
    return request.param, models, images, labels


def masks_for(n: int, k: int, kind: str, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "hard":
        m = (torch.rand(k, n, generator=g) >= 0.5).float()
    else:
        m = torch.rand(k, n, generator=g)
        m[m < 0.2] = 0  # soft with some exact zeros
    m[0] = 1  # the unpruned model is always among the masks
    return m


def assert_matches(got, want):
    assert torch.equal(got.correct, want.correct)
    assert torch.equal(got.class_counts, want.class_counts)
    torch.testing.assert_close(got.ce_sum, want.ce_sum, rtol=1e-5, atol=0)
    scale = want.logits.abs().amax()
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5 * float(scale))


# Every K meets both mask kinds and both perturbation states (a covering design keeps the suite fast).
COMBOS = [(1, "hard", True), (1, "soft", False), (7, "hard", False), (7, "soft", True), (32, "hard", True),
          (32, "soft", False)]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.mark.parametrize("k,kind,perturbed", COMBOS)
def test_engine_matches_loop(setup, k, kind, perturbed):
    arch, models, images, labels = setup
    n = bn_neurons(models[0]).size
    masks = masks_for(n, k, kind)
    pert = Perturbations.random(2, n, eps=0.4, seed=5) if perturbed else None
    want = loop_reference(models, masks, images, labels, pert, return_logits=True)
    assert want.correct.shape == (2, 3 if perturbed else 1, k)
    for strategy in ["sliced", "batched"]:
        got = RewardEngine(models, strategy=strategy).score(masks, images, labels, pert, return_logits=True)
        assert_matches(got, want)


def test_naive_batch_reference_matches_loop(setup):
    _, models, images, labels = setup
    masks = masks_for(bn_neurons(models[0]).size, 5, "hard")
    want = loop_reference(models, masks, images, labels, return_logits=True)
    assert_matches(naive_batch_reference(models, masks, images, labels, return_logits=True, chunk=2), want)


@pytest.mark.parametrize("strategy", ["sliced", "batched"])
def test_memory_budget_forces_chunking_same_results(setup, strategy):
    _, models, images, labels = setup
    masks = masks_for(bn_neurons(models[0]).size, 9, "hard")
    big = RewardEngine(models, strategy=strategy, max_memory="4GB")
    shared, per_mask = big.memory_per_mask(images)
    small = RewardEngine(models, strategy=strategy, max_memory=shared + 2 * per_mask + 1)
    if strategy == "batched":
        assert big.chunk(9, images) == 9 and small.chunk(9, images) == 2
    a = big.score(masks, images, labels, return_logits=True)
    b = small.score(masks, images, labels, return_logits=True)
    assert torch.equal(a.correct, b.correct) and torch.equal(a.class_counts, b.class_counts)
    torch.testing.assert_close(a.ce_sum, b.ce_sum, rtol=1e-6, atol=0)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    one_shared, one_mask = big.memory_per_mask(images[:1])
    with pytest.raises(UserError, match="too small"):  # not one mask over one image
        RewardEngine(models, strategy=strategy, max_memory=(one_shared + one_mask) // 2).score(masks, images, labels)


@pytest.mark.parametrize("strategy", ["sliced", "batched"])
def test_a_budget_under_one_mask_over_every_image_chunks_the_images_same_results(setup, strategy):
    """Where one mask over all B images exceeds the budget, the images run in passes the budget holds and the
    epilogue's sums add up: the same results for two image parts, one of them split across passes."""
    _, models, images, labels = setup
    masks = masks_for(bn_neurons(models[0]).size, 5, "hard")
    big = RewardEngine(models, strategy=strategy, max_memory="4GB")
    one_shared, one_mask = big.memory_per_mask(images[:1])
    small = RewardEngine(models, strategy=strategy, max_memory=3 * (one_shared + one_mask) + 1)
    assert big.images_per_pass(images) == len(images) and small.images_per_pass(images) == 3 < len(images)
    parts = [(images[:5], labels[:5]), (images[5:], labels[5:])]
    for a, b in zip(big.score_parts(masks, parts, return_logits=True),
                    small.score_parts(masks, parts, return_logits=True)):
        assert torch.equal(a.correct, b.correct) and torch.equal(a.class_counts, b.class_counts)
        torch.testing.assert_close(a.ce_sum, b.ce_sum, rtol=1e-6, atol=0)
        torch.testing.assert_close(a.prob_sum, b.prob_sum, rtol=1e-6, atol=0)
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)


def test_sliced_skips_flops_of_zeroed_channels():
    m = build("preactresnet18", width=0.5, input_size=SIZE)  # 32..256 channels: padding to 8 matters little
    images = torch.randn(B, 3, SIZE, SIZE)
    n = bn_neurons(m).size
    eng = RewardEngine(m)
    plan = eng.plans[0]
    plan.flops = 0
    eng.score(torch.ones(1, n), images, torch.zeros(B, dtype=torch.int64))
    dense = plan.flops
    plan.flops = 0
    eng.score(masks_for(n, 2, "hard")[1:], images, torch.zeros(B, dtype=torch.int64))
    assert plan.flops < 0.6 * dense  # half the channels kept: at most about half the FLOPs


def test_group_masks_and_partial_units():
    m = model("vgg16_bn", 0)
    full = bn_neurons(m)
    first = full.units[0]
    # only the first 3 channels of the first BN are maskable; everything else stays on
    part = NeuronSet((NeuronUnit(first.module, 0, 3, 0),))
    images, labels = torch.randn(B, 3, SIZE, SIZE), torch.randint(0, 10, (B,))
    group_masks = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    masks = expand_groups(group_masks, torch.tensor([0, 1, 1]))
    got = RewardEngine(m, part).score(masks, images, labels, return_logits=True)
    full_masks = torch.ones(2, full.size)
    full_masks[:, :3] = masks
    assert_matches(got, loop_reference(m, full_masks, images, labels, return_logits=True))


def test_restores_training_mode_and_checks_input():
    m = model("resnet18", 0).train()
    n = bn_neurons(m).size
    eng = RewardEngine(m)
    images, labels = torch.randn(B, 3, SIZE, SIZE), torch.randint(0, 10, (B,))
    eng.score(torch.ones(2, n), images, labels)
    assert m.training and all(mod.training for mod in m.modules())
    with pytest.raises(UserError, match="masks must be"):
        eng.score(torch.ones(2, n + 1), images, labels)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        eng.score(torch.full((2, n), 2.0), images, labels)
    with pytest.raises(UserError, match="must match"):
        eng.score(torch.ones(2, n), images, labels[:3])
    with pytest.raises(UserError, match="strategy"):
        RewardEngine(m, strategy="fast")


def test_parse_memory():
    assert parse_memory("512MB") == 512 * 10**6
    assert parse_memory("1.5GiB") == int(1.5 * 2**30)
    assert parse_memory(4096) == 4096
    assert parse_memory("800k") == 800_000
    for bad in ["lots", "-1GB", "0", "12 parsecs"]:
        with pytest.raises(UserError):
            parse_memory(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_cuda_matches_loop():
    models = [model("preactresnet18", 0).cuda(), model("preactresnet18", 1).cuda()]
    n = bn_neurons(models[0]).size
    masks = masks_for(n, 7, "hard").cuda()
    images, labels = torch.randn(B, 3, SIZE, SIZE).cuda(), torch.randint(0, 10, (B,)).cuda()
    pert = Perturbations.random(2, n)
    want = loop_reference(models, masks, images, labels, Perturbations(pert.d_gamma.cuda(), pert.d_beta.cuda()),
                          return_logits=True)
    want.logits = want.logits.cpu()
    got = RewardEngine(models).score(masks, images, labels, pert, return_logits=True)
    assert torch.equal(got.correct, want.correct.cpu())
    torch.testing.assert_close(got.ce_sum, want.ce_sum.cpu(), rtol=1e-4, atol=0)


def test_keep_sets_slice_only_when_enough_channels_are_pruned():
    from onp_fast.reward.engine import _keep_sets

    m = torch.ones(4, 64)
    m[1, :3] = 0  # 61 survive -> 64 after padding: dense
    m[2, :20] = 0  # 44 survive -> 48 of 64 (75%): sliced
    m[3] = 0  # nothing survives: dense (scale 0)
    sets = _keep_sets(m)
    assert sets[0] is None and sets[1] is None and sets[3] is None
    assert sets[2].tolist() == sorted(set(range(20, 64)) | set(range(4)))  # survivors + 4 pruned as padding
    assert _keep_sets(m, dense_above=1.0)[1] is None  # padding reaches C: dense either way
    m[1, :12] = 0  # 52 survive -> 56 of 64 (87.5%): dense at 0.8, sliced at 0.9
    assert _keep_sets(m)[1] is None and _keep_sets(m, dense_above=0.9)[1] is not None
