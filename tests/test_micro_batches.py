"""Training steps under --max-memory: a step whose batch the activation budget cannot hold runs as micro-batches
with its gradient accumulated (`memory.micro_batch`); unlearning (BatchNorm frozen) and fine-tuning without
BatchNorm in training mode then take the step the whole batch takes, up to float rounding (the micro-batches'
losses add up to the whole batch's, through distillation, labels where the teacher is wrong, the hard-label
share, augment's copies and the sharpness-aware step); with BatchNorm in training mode it runs on ghost-batch
statistics; a budget that holds the batch, or none, is bit for bit the whole step; only a budget under the
smallest micro-batch is an error, before any work."""
import copy

import pytest
import torch
import torch.nn as nn

from onp_fast import models
from onp_fast.errors import UserError
from onp_fast.groups import find_groups
from onp_fast.memory import activation_bytes, micro_batch, train_mode_min
from onp_fast.prepare.finetune import _micro_batches, finetune_pruned
from onp_fast.prepare.unlearn import unlearn

pytestmark = pytest.mark.usefixtures("one_thread")


def _bn_model(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return models.build("preactresnet18", num_classes=4, in_channels=1, width=0.125, input_size=8).eval()


def _plain_model(seed=0) -> nn.Module:
    """Convolutions and a linear layer, no BatchNorm: a step's loss is a sum over its images."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4)).eval()


def _data(n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 4


def _copies(per_image: int):
    """augment: `per_image` noisy copies of each image appended after the batch's own images, same labels."""
    def augment(xb, yb, g):
        noisy = xb.repeat(per_image, 1, 1, 1)
        return torch.cat([xb, noisy + torch.randn(noisy.shape, generator=g)]), torch.cat([yb] * (per_image + 1))
    return augment


def _equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def _close(a: nn.Module, b: nn.Module, atol=1e-5) -> bool:
    return all(torch.allclose(p.float(), q.float(), atol=atol, rtol=1e-4)
               for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_micro_batch_is_the_whole_batch_or_the_most_that_fit_and_refuses_only_under_the_smallest():
    m = _bn_model()
    x, _ = _data(8)
    per = activation_bytes(m, x)
    assert micro_batch(m, x, 64, None) == micro_batch(m, x, 64, "1GB") == 64  # whole: as without a budget
    assert micro_batch(m, x, 64, 5 * per) == 5 and micro_batch(m, x, 64, 2 * per) == 2
    assert micro_batch(m, x, 64, 3 * per + 1, "fine-tuning") == 3 and micro_batch(m, x, 64, None, "x") == 64
    assert micro_batch(m, x, 64, per, min_size=1) == 1  # eval mode: one image is a micro-batch
    for budget, min_size in ((2 * per - 1, 2), (per - 1, 1), (1000, 2)):
        with pytest.raises(UserError) as err:
            micro_batch(m, x, 64, budget, "fine-tuning", min_size=min_size)
        line = str(err.value)
        assert "\n" not in line and "too small for fine-tuning" in line and "--max-memory" in line
        assert f"micro-batch of {min_size} image" in line and "of a step's 64" in line and "needs about" in line


def test_micro_batches_keep_the_own_to_copies_proportion_and_two_images_each():
    for own, total, size in ((16, 32, 3), (16, 64, 2), (5, 5, 2), (64, 128, 50), (7, 10, 4), (32, 32, 32)):
        parts = _micro_batches(own, total, size)
        allpos = torch.cat([p for _, p in parts])
        assert torch.equal(allpos.sort().values, torch.arange(total))  # every image once
        sizes = [len(p) for _, p in parts]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 2
        assert max(sizes) <= size or (size == 2 and total % 2 == 1 and max(sizes) == 3)
        mine = [len(a) for a, _ in parts]
        assert max(mine) - min(mine) <= 1 and all(torch.equal(p[:len(a)], a) for a, p in parts)
        assert all((p[len(a):] >= own).all() for a, p in parts)  # own images first, then copies


def test_unlearning_split_into_micro_batches_takes_the_same_steps():
    """BatchNorm is frozen while unlearning: micro-batches of 3 give the whole batch's steps up to rounding."""
    m = _bn_model()
    x, y = _data(48)
    per = activation_bytes(m, x)
    kw = dict(lr=0.01, max_epochs=2, batch_size=16, seed=3, target_acc=0.0)
    whole, info = unlearn(m, x, y, **kw)
    same, info_same = unlearn(m, x, y, max_memory="1GB", **kw)
    split, info_split = unlearn(m, x, y, max_memory=3 * per, **kw)
    assert info["micro_batch"] == info_same["micro_batch"] == 16 and info_split["micro_batch"] == 3
    assert info["steps"] == info_split["steps"] == 6
    assert _equal(whole, same)  # a budget that holds the batch: bit for bit
    assert not _close(whole, m, atol=1e-4) and _close(whole, split)
    with pytest.raises(UserError, match="too small for unlearning: even a micro-batch of 1 image"):
        unlearn(m, x, y, max_memory=per - 1, **kw)


FT = dict(epochs=2, lr=0.05, batch_size=16, seed=2, rho=0.5, label_smoothing=0.1, hard_weight=0.3,
          labels_where_wrong=True, max_grad_norm=5.0, cosine_t_max=0)


@pytest.mark.parametrize("per_image,chunk,distill", [(1, 3, True), (3, 2, True), (0, 3, True), (1, 3, False)],
                         ids=["copies-3", "3-copies-each-2", "no-copies", "no-teacher"])
def test_fine_tuning_without_batchnorm_split_into_micro_batches_takes_the_same_steps(per_image, chunk, distill):
    """Distillation from a teacher, labels where it is wrong, a hard-label share, augment's copies (as many as the
    own images, or three times as many: micro-batches of copies only), or plain cross-entropy without a teacher,
    and the sharpness-aware step: the micro-batches' weighted losses add up to the whole batch's, so the weights
    match the unsplit run's."""
    m, teacher = _plain_model(0), _plain_model(5) if distill else None
    x, y = _data(48)
    groups = find_groups(m, (1, 8, 8))
    prune = torch.zeros(groups.num_groups, dtype=torch.bool)
    prune[[0, 7]] = True
    per = activation_bytes(m, x)
    augment = _copies(per_image) if per_image else None
    kw = dict(FT, teacher=teacher, augment=augment)
    with torch.no_grad():  # both kinds of own-image terms are used
        assert teacher is None or 0 < int((teacher(x).argmax(1) != y).sum()) < len(x)
    infos = [{}, {}, {}]
    whole = finetune_pruned(copy.deepcopy(m), groups, prune, x, y, info=infos[0], **kw)
    same = finetune_pruned(copy.deepcopy(m), groups, prune, x, y, max_memory="1GB", info=infos[1], **kw)
    seen = []
    model = copy.deepcopy(m)
    model.register_forward_hook(lambda mod, inp, out: seen.append(len(inp[0])))
    split = finetune_pruned(model, groups, prune, x, y, max_memory=chunk * per + 1, info=infos[2], **kw)
    assert max(seen) <= chunk  # every forward of a step, the sharpness-aware one at w + e too
    batch = 16 * (1 + per_image)
    assert infos[0] == infos[1] == {"batch": batch, "micro_batch": batch, "micro_batches": 1}
    assert infos[2]["batch"] == batch and infos[2]["micro_batch"] <= chunk
    assert infos[2]["micro_batches"] == -(-batch // chunk)
    assert _equal(whole, same)  # a budget that holds the batch: bit for bit
    assert not _close(whole, m, atol=1e-3) and _close(whole, split)
    assert torch.equal(whole[0].weight[0], torch.zeros_like(whole[0].weight[0]))  # pruned, held at zero
    assert torch.equal(split[0].weight[0], torch.zeros_like(split[0].weight[0]))


def test_fine_tuning_with_batchnorm_in_training_mode_runs_on_ghost_batches():
    m = _bn_model()
    x, y = _data(48)
    groups = find_groups(m, (1, 8, 8))
    prune = torch.zeros(groups.num_groups, dtype=torch.bool)
    prune[:5] = True
    per = activation_bytes(m, x)
    kw = dict(FT, teacher=_bn_model(4), augment=_copies(1), sam_bn_frozen=True)
    infos = [{}, {}, {}]
    whole = finetune_pruned(copy.deepcopy(m), groups, prune, x, y, info=infos[0], **kw)
    same = finetune_pruned(copy.deepcopy(m), groups, prune, x, y, max_memory="1GB", info=infos[1], **kw)
    split = finetune_pruned(copy.deepcopy(m), groups, prune, x, y, max_memory=5 * per, info=infos[2], **kw)
    assert _equal(whole, same) and infos[0] == infos[1] == {"batch": 32, "micro_batch": 32, "micro_batches": 1}
    assert infos[2] == {"batch": 32, "micro_batch": 5, "micro_batches": 7}
    assert all(torch.isfinite(p).all() for p in split.state_dict().values() if p.is_floating_point())
    assert not _close(split, m, atol=1e-3)  # it trained
    assert any(not torch.allclose(p, q, atol=1e-5) for p, q in zip(whole.parameters(), split.parameters()))
    # ghost-batch statistics: not the whole batch's step
    keep = copy.deepcopy(split)
    groups.prune_(keep, ~prune)
    assert _equal(keep, split)  # pruned groups held at zero
    assert not split.training and not any(p.requires_grad for p in split.parameters())


def test_a_budget_under_two_images_is_an_error_before_the_first_step():
    m = _bn_model()
    x, y = _data(48)
    groups = find_groups(m, (1, 8, 8))
    before = copy.deepcopy(m)
    with pytest.raises(UserError) as err:
        finetune_pruned(m, groups, torch.zeros(groups.num_groups, dtype=torch.bool), x, y, epochs=1,
                        batch_size=16, augment=_copies(1), max_memory="1KB")
    line = str(err.value)
    assert "\n" not in line and "too small for fine-tuning" in line and "micro-batch of 2 images" in line
    assert "of a step's 32" in line and "needs about" in line
    assert _equal(m, before)  # no step was taken


def test_without_batchnorm_a_training_step_may_run_one_image_at_a_time():
    """Two images are the least a training-mode micro-batch holds only where a BatchNorm normalises over it: a
    model without one (a ViT, _plain_model) is purified one image at a time under a budget of one image, the
    same step as the whole batch's; with BatchNorm the same budget is refused."""
    plain, bn = _plain_model(), _bn_model()
    x, y = _data(48)
    assert train_mode_min(plain) == 1 and train_mode_min(bn) == 2
    per = activation_bytes(plain, x)
    assert micro_batch(plain, x, 64, per) == 1
    with pytest.raises(UserError, match="micro-batch of 2 images"):
        micro_batch(bn, x, 64, activation_bytes(bn, x))
    groups = find_groups(plain, (1, 8, 8))
    none = torch.zeros(groups.num_groups, dtype=torch.bool)
    whole, split, info = copy.deepcopy(plain), copy.deepcopy(plain), {}
    finetune_pruned(whole, groups, none, x, y, epochs=1, batch_size=16)
    finetune_pruned(split, groups, none, x, y, epochs=1, batch_size=16, max_memory=per, info=info)
    assert info["micro_batch"] == 1 and info["micro_batches"] == 16
    for p, q in zip(whole.parameters(), split.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5)
