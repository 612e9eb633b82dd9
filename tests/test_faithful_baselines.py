"""ANP, RNP and FT-SAM follow their official code (csdongxian/ANP_backdoor ec7b179, bboylyg/RNP eeae192,
SCLBD/BackdoorBench f02e353's defense/ft-sam.py) in the details that were found to differ: ANP's sign noise step
(unclamped), ANP's train-mode BN on a copy, RNP's unlearning stop (once per epoch, accuracy <= 0.2), RNP's
recovery mask on the BN weight only; FT-SAM's per-batch periodic cosine, its BN-frozen second pass, its label
smoothing and its random crop. Tiny models, one thread."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from train_helpers import quadrant_data as _data, fit

from onp_fast import models
from onp_fast.defenses import ANPConfig, FTSAMConfig, RNPConfig
from onp_fast.defenses.anp import Perturbation, anp_masks, noise_step, working_copy
from onp_fast.defenses.rnp import WeightMasks, recover_masks, rnp_unlearn
from onp_fast.groups import find_groups
from onp_fast.prepare.finetune import smooth_cross_entropy
from onp_fast.repair import RepairConfig, repair

pytestmark = pytest.mark.usefixtures("one_thread")
NUM_CLASSES = 4




def _tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.build("preactresnet18", num_classes=NUM_CLASSES, in_channels=1, width=0.125, input_size=8)


@pytest.fixture(scope="module")
def trained():
    """A tiny PreActResNet-18 fitted to the quadrant task (eval mode), and 64 defense images."""
    m = _tiny()
    x, y = _data(160, seed=1)
    fit(m, x, y, epochs=4)
    xd, yd = _data(64, seed=2)
    with torch.no_grad():
        assert (m(xd).argmax(1) == yd).float().mean() > 0.9
    return m, xd, yd


def _bn_names(model):
    return [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)]


def _ce_with_bn(model, x, y, scale: dict, shift: dict):
    """CE of `model` (its own mode) with each BN's weight * scale[n] and bias * shift[n], by functional_call:
    the official NoisyBatchNorm2d / MaskBatchNorm2d written out, independent of our hooks."""
    params = dict(model.named_parameters())
    for n in scale:
        params[f"{n}.weight"] = params[f"{n}.weight"] * scale[n]
        params[f"{n}.bias"] = params[f"{n}.bias"] * shift[n]
    return F.cross_entropy(functional_call(model, {**params, **dict(model.named_buffers())}, (x,)), y)


def test_defaults_are_the_official_settings():
    a = ANPConfig()
    assert (a.eps, a.alpha, a.iterations, a.mask_lr, a.batch_size, a.noise_steps, a.threshold) == \
        (0.4, 0.2, 2000, 0.2, 128, 1, 0.2)
    assert (a.noise_step, a.bn_mode) == ("sign", "train")
    r = RNPConfig()
    assert (r.unlearn_lr, r.unlearn_target, r.unlearn_epochs, tuple(r.unlearn_milestones), r.unlearn_clip) == \
        (0.01, 0.2, 20, (10, 20), 0.0)
    assert (r.recover_lr, r.recover_epochs, r.alpha, r.batch_size, r.threshold) == (0.2, 20, 0.2, 128, 0.2)
    assert (r.stop_check, r.bn_mode, r.mask_on) == ("epoch", "train", "norm_weight")


def test_anp_noise_step_is_eps_over_steps_times_the_sign_and_unclamped(trained):
    m, x, y = trained
    cfg = ANPConfig(eps=0.4, noise_steps=2)  # lr eps / steps = 0.2
    lr = cfg.eps / cfg.noise_steps
    work = working_copy(m, "train")
    g = torch.Generator().manual_seed(3)
    ref_model = copy.deepcopy(work)  # before the layers' forwards are replaced
    with Perturbation(work) as p:
        for n in p.names:  # a known start on the faces of [-eps, eps]: a clamp there would show
            p.noise[n] = torch.where(torch.rand(len(p.noise[n]), generator=g) < 0.5, -cfg.eps, cfg.eps)
            p.noise_b[n] = torch.where(torch.rand(len(p.noise[n]), generator=g) < 0.5, -cfg.eps, cfg.eps)
        start = {n: (p.noise[n].clone(), p.noise_b[n].clone()) for n in p.names}
        # The reference gradient of CE(perturbed) at the start, masks at 1: weight * (1 + d), bias * (1 + d_b).
        leaves = {n: (s.clone().requires_grad_(True), sb.clone().requires_grad_(True)) for n, (s, sb) in start.items()}
        loss = _ce_with_bn(ref_model, x, y, {n: 1 + d for n, (d, _) in leaves.items()},
                           {n: 1 + db for n, (_, db) in leaves.items()})
        grads = torch.autograd.grad(loss, [t for pair in leaves.values() for t in pair])
        noise_step(work, p, x, y, cfg)
        moved = 0
        beyond = 0
        for i, n in enumerate(p.names):
            for now, before, gr in ((p.noise[n], start[n][0], grads[2 * i]), (p.noise_b[n], start[n][1], grads[2 * i + 1])):
                sure = gr.abs() > 1e-6  # far from a sign flip by rounding
                assert torch.allclose(now[sure], before[sure] + lr * torch.sign(gr[sure]), atol=1e-7, rtol=0), n
                assert torch.allclose((now - before).abs()[gr != 0], torch.tensor(lr), atol=1e-7), n
                moved += int(sure.sum())
                assert (now.abs() <= 2 * cfg.eps + 1e-6).all()  # start in [-eps, eps] + at most eps of steps
                beyond += int((now.abs() > cfg.eps + 1e-6).sum())
        assert moved > 100 and beyond > 50  # the official code does not clamp back to [-eps, eps]


def _scaled(norm, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    return norm


@pytest.mark.parametrize("kind", ["batch", "layer"])
def test_anp_and_rnp_masks_compute_the_official_layers_arithmetic_bit_for_bit(kind):
    """NoisyBatchNorm2d / MaskBatchNorm2d: F.batch_norm of the input with gamma * coeff and beta * coeff_b, the
    running statistics updated once per forward; LayerNorm alike. Rescaling the layer's output instead rounds
    differently, so torch.equal tells the two apart."""
    norm = _scaled(torch.nn.BatchNorm2d(6) if kind == "batch" else torch.nn.LayerNorm(6), 0).train()
    x = torch.randn(16, 6, 5, 5) * 3 + 1 if kind == "batch" else torch.randn(16, 7, 6) * 3 + 1
    ref = copy.deepcopy(norm)
    model = torch.nn.Sequential(norm)

    def official(weight, bias):
        if kind == "layer":
            return F.layer_norm(x, (6,), weight, bias, ref.eps)
        return F.batch_norm(x, ref.running_mean, ref.running_var, weight, bias, True, ref.momentum, ref.eps)

    g = torch.Generator().manual_seed(1)
    with Perturbation(model) as p:
        m, d, db = (torch.rand(6, generator=g) for _ in range(3))
        p.masks["0"].data.copy_(m)
        p.noise["0"], p.noise_b["0"] = (d - 0.5) * 0.8, (db - 0.5) * 0.8
        p.perturbed = True
        got = model(x)
        assert torch.equal(got, official(ref.weight * (m + p.noise["0"]), ref.bias * (1.0 + p.noise_b["0"])))
        p.perturbed = False
        assert torch.equal(model(x), official(ref.weight * m, ref.bias))
        if kind == "batch":  # two forwards, two updates, as the official layer's
            assert torch.equal(norm.running_mean, ref.running_mean) and int(norm.num_batches_tracked) == 2
    for shift in (False, True):
        with WeightMasks(model, shift=shift) as w:
            w.masks["0"].data.copy_(m)
            assert torch.equal(model(x), official(ref.weight * m, ref.bias * m if shift else ref.bias))
    assert "forward" not in norm.__dict__ and torch.equal(model(x), official(ref.weight, ref.bias))  # restored


def test_anp_in_train_mode_leaves_the_callers_model_and_statistics_alone(trained):
    m0, x, y = trained
    m = copy.deepcopy(m0).eval()
    state = copy.deepcopy(m.state_dict())  # weights, running means / variances, num_batches_tracked
    flags = [q.requires_grad for q in m.parameters()]
    cfg = ANPConfig(iterations=4, batch_size=16)
    masks = anp_masks(m, x, y, cfg, seed=0)
    after = m.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in state.items())
    assert not m.training and [q.requires_grad for q in m.parameters()] == flags
    assert not m._forward_hooks and all(not mod._forward_hooks for mod in m.modules())
    # Train mode is really used (batch statistics): eval mode gives other masks from the same draws.
    ev = anp_masks(m, x, y, ANPConfig(iterations=4, batch_size=16, bn_mode="eval"), seed=0)
    assert any(not torch.allclose(masks[k], ev[k]) for k in masks)


def test_rnp_unlearning_stops_once_per_epoch_at_the_published_threshold(trained):
    m0, x, y = trained
    m = copy.deepcopy(m0)
    batch = 8  # 8 batches an epoch of 64: a single batch's accuracy swings widely
    seen = []  # (predictions, labels) of every unlearning forward, in order

    def record(mod, inp, out):
        xb = inp[0]
        idx = (xb.flatten(1)[:, None] == x.flatten(1)[None]).all(-1).float().argmax(1)
        seen.append((out.detach().argmax(1), y[idx]))

    m.register_forward_hook(record)  # deep-copied along with the model: the closure's list is shared
    cfg = RNPConfig(batch_size=batch)
    assert cfg.unlearn_target == 0.2
    u, info = rnp_unlearn(m, x, y, cfg, seed=0)
    per_epoch = len(x) // batch
    assert info["steps"] == len(seen) and len(seen) % per_epoch == 0  # it stopped only at an epoch's end
    correct = [int((p == t).sum()) for p, t in seen]
    epoch_acc = [sum(correct[i:i + per_epoch]) / len(x) for i in range(0, len(seen), per_epoch)]
    assert epoch_acc == pytest.approx(info["epoch_accuracy"])
    assert all(a > 0.2 for a in epoch_acc[:-1]) and epoch_acc[-1] <= 0.2 and info["reached"]
    # Planted: a per-step check would have stopped earlier, at a batch at or below 0.2 in an earlier epoch.
    first_low = next(i for i, c in enumerate(correct) if c / batch <= 0.2)
    assert first_low < len(seen) - per_epoch
    assert info["epochs"] == len(epoch_acc) >= 2 and not u.training


def test_rnp_recovery_masks_the_bn_weight_only(trained):
    m, x, y = trained
    u, _ = rnp_unlearn(m, x, y, RNPConfig(batch_size=16), seed=0)
    groups = find_groups(u, (1, 8, 8))
    lr = 0.2
    # One recovery step on one batch of all 64 (plain SGD on the first step: momentum has no history yet).
    masks = recover_masks(u, groups, x, y, lr=lr, epochs=1, alpha=0.2, batch_size=len(x), seed=0)
    ref = working_copy(u, "train")
    names = _bn_names(ref)
    assert set(masks) == set(names)
    ones = {n: torch.ones_like(masks[n]).requires_grad_(True) for n in names}
    untouched = {n: torch.ones_like(masks[n]) for n in names}

    def expected(shift):
        loss = 0.2 * _ce_with_bn(ref, x, y, ones, shift)
        gr = torch.autograd.grad(loss, [ones[n] for n in names])
        return {n: (1 - lr * g).clamp(0, 1) for n, g in zip(names, gr)}

    weight_only = expected(untouched)
    assert all(torch.allclose(masks[n], weight_only[n], atol=1e-5) for n in names)
    both = expected(ones)  # the mask on the shift as well: other gradients, so the test can tell
    assert any(not torch.allclose(masks[n], both[n], atol=1e-5) for n in names)


# FT-SAM as BackdoorBench's defense/ft-sam.py runs it (the radius of its adaptive step: tests/test_purify.py).

def test_ftsam_defaults_are_backdoorbenchs():
    c = FTSAMConfig()
    assert (c.epochs, c.lr, c.rho, c.label_smoothing, c.t_max, c.crop_padding, c.bn_frozen_second_pass) == \
        (100, 0.01, 2.0, 0.1, 100, 4, True)


def test_ftsam_learning_rate_is_a_cosine_of_period_100_steps_stepped_every_batch(monkeypatch):
    lrs = []
    real = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: lrs.append((self, self.param_groups[0]["lr"]))
                        or real(self, *a, **k))
    x, y = _data(40, seed=3)
    repair(_tiny(), x, y, NUM_CLASSES, "ftsam", RepairConfig(reward_batch=16),
           FTSAMConfig(epochs=45, batch_size=8, crop_padding=0), progress=False)
    lrs = [lr for opt, lr in lrs if opt is lrs[-1][0]]  # FT-SAM's optimiser (prepare's unlearning has its own)
    assert len(lrs) == 45 * 5
    expected = [0.01 * (1 + math.cos(math.pi * t / 100)) / 2 for t in range(len(lrs))]
    assert lrs == pytest.approx(expected, abs=1e-9)
    assert lrs[100] == pytest.approx(0, abs=1e-12) and lrs[200] == pytest.approx(0.01)  # periodic, not one decay


def test_ftsam_second_pass_leaves_the_running_statistics_alone():
    m = _tiny()
    x, y = _data(40, seed=4)
    r = repair(m, x, y, NUM_CLASSES, "ftsam", RepairConfig(reward_batch=16),
               FTSAMConfig(epochs=1, batch_size=64, crop_padding=0), progress=False)  # one step on all 40 images
    once = copy.deepcopy(m).train()
    with torch.no_grad():
        once(x)  # one update of the running statistics, with the batch statistics at the weights before the step
    for name in _bn_names(m):
        got, want = r.model.get_submodule(name), once.get_submodule(name)
        assert torch.allclose(got.running_mean, want.running_mean, atol=1e-6), name
        assert torch.allclose(got.running_var, want.running_var, atol=1e-5), name


def test_ftsam_label_smoothing_puts_s_over_n_minus_1_on_every_other_class():
    logits, y = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3, 4, 0])
    target = torch.full((6, 5), 0.1 / 4)
    target[torch.arange(6), y] = 0.9
    want = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    assert smooth_cross_entropy(logits, y, 0.1) == pytest.approx(float(want), abs=1e-6)
    assert float(F.cross_entropy(logits, y, label_smoothing=0.1)) != pytest.approx(float(want), abs=1e-4)


def test_ftsam_crops_every_batch_at_a_random_offset_of_the_padded_image(monkeypatch):
    import onp_fast.defenses.ftsam as ftsam

    x = torch.randn(16, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    fill = torch.tensor([-3.0, -4.0])
    out = ftsam.random_crop(x, 2, fill, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    big = fill.view(1, 2, 1, 1).repeat(16, 1, 10, 10)
    big[:, :, 2:8, 2:8] = x
    offsets = [[(i, j) for i in range(5) for j in range(5) if torch.equal(out[b], big[b, :, i:i + 6, j:j + 6])]
               for b in range(16)]
    assert all(offsets) and len({o[0] for o in offsets}) > 1  # each a window of the padded image, not all alike
    calls = []
    real = ftsam.random_crop
    monkeypatch.setattr(ftsam, "random_crop", lambda *a: calls.append(a[1]) or real(*a))
    xd, yd = _data(40, seed=5)
    repair(_tiny(), xd, yd, NUM_CLASSES, "ftsam", RepairConfig(reward_batch=16), FTSAMConfig(epochs=2),
           progress=False)
    assert calls == [4, 4]  # every batch (one per epoch here), padding 4
