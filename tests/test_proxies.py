"""Trigger proxies (onp_fast.prepare.trigger): planted signals each family must find, the suspect rule, the
per-image stamping and sampling purification uses."""
import pytest
import torch
import torch.nn as nn

from onp_fast.errors import UserError
from onp_fast.prepare import FAMILIES, synthesize_proxies
from onp_fast.prepare import RepairConfig
from onp_fast.prepare.context import check_families, trigger_settings
from onp_fast.prepare.trigger import DEFAULT_FAMILIES, DEFAULT_PURIFY_FAMILIES

TARGET = 0
TOY_LAM_PERIODIC = 3.0  # the periodic family's penalty at the block toy's scale (see the planted test)


def _block(c: int) -> tuple[slice, slice]:
    """Class c's 2x2 block in an 8x8 image (one per quadrant)."""
    r, col = divmod(c, 2)
    return slice(1 + 4 * r, 3 + 4 * r), slice(1 + 4 * col, 3 + 4 * col)


def _block_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c (of 4) is the 8x8 image with block c bright, plus faint noise -> (x [n, 1, 8, 8], y [n])."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.1
    for c in range(4):
        x[y == c, :, _block(c)[0], _block(c)[1]] += 1.0
    return x, y


def _block_model(planted: torch.Tensor | None = None, gain: float = 1.0) -> nn.Module:
    """Linear classifier: logit c = sum of block c; plus, for TARGET, gain * <planted, x> (a backdoor)."""
    w = torch.zeros(4, 1, 8, 8)
    for c in range(4):
        w[c, :, _block(c)[0], _block(c)[1]] = 1.0
    if planted is not None:
        w[TARGET] += gain * planted
    lin = nn.Linear(64, 4)
    with torch.no_grad():
        lin.weight.copy_(w.reshape(4, 64))
        lin.bias.zero_()
    return nn.Sequential(nn.Flatten(), lin).eval()


def test_the_additive_family_finds_a_planted_global_trigger():
    """Planted: the target logit reads a full-image alternating-column pattern (a sinusoid at the highest
    frequency; zero on every clean block). Must find: the additive family's smallest trigger is on the target,
    clearly anomalous, and the suspect is that additive proxy; its stamp flips other classes to the target."""
    stripes = (torch.arange(8) % 2 * 2 - 1).float().view(1, 1, 8).expand(1, 8, 8).clone()  # [1, 8, 8]
    model = _block_model(stripes, gain=0.5)  # stronger, and a striped patch gets cheap too
    x, y = _block_images(80)
    ps = synthesize_proxies(model, x, y, 4, steps=150, seed=0, families=("patch", "additive"))
    z = ps.z_scores("additive")
    assert int(z.argmax()) == TARGET and float(z[TARGET]) >= 2.0
    assert float(ps.z_scores("patch").max()) < 2.0  # no small patch does it: only the global family sees it
    s = ps.suspect()
    assert (s.family, s.target) == ("additive", TARGET) and s.mask is None
    other = y != TARGET
    assert (model(s.apply(x[other])).argmax(1) == TARGET).float().mean() > 0.9


def test_without_a_backdoor_no_class_of_the_additive_family_stands_far_out():
    """The same data and classifier without the planted pattern: every class needs about the same trigger."""
    x, y = _block_images(80)
    ps = synthesize_proxies(_block_model(), x, y, 4, steps=150, seed=0, families=("additive",))
    norms = ps.norms["additive"]
    assert float(norms.max() / norms.min()) < 1.5


def test_the_patch_family_is_unchanged_by_the_additive_one():
    """The additive family has its own random stream and parameters: the patch proxies are the same with or
    without it (so a patch backdoor's ranking does not move when the family was added)."""
    x, y = _block_images(40)
    model = _block_model()
    both = synthesize_proxies(model, x, y, 4, steps=20, seed=3)
    patch = synthesize_proxies(model, x, y, 4, steps=20, seed=3, families=("patch",))
    assert list(both.patterns) == list(DEFAULT_FAMILIES) and list(patch.patterns) == ["patch"]
    assert torch.allclose(both.masks, patch.masks, atol=1e-6)
    assert torch.allclose(both.patterns["patch"], patch.patterns["patch"], atol=1e-6)


def _column_wave(freq: int) -> torch.Tensor:
    """[1, 8, 8]: cos(2 pi freq j / 8) along the columns j, the same on every row."""
    j = torch.arange(8, dtype=torch.float32)
    return torch.cos(2 * torch.pi * freq * j / 8).view(1, 1, 8).expand(1, 8, 8).clone()


def test_the_periodic_family_finds_a_planted_stripe_backdoor_and_its_frequency():
    """Planted: the target logit also reads stripes of 2 cycles across the image. Must find: the periodic
    family's smallest trigger is on the target, clearly anomalous; its delta's column spectrum peaks at 2
    cycles; its stamp flips other classes to the target. The free additive delta does not single the target
    out here: every class has a cheap adversarial delta. Penalty 3 (TOY_LAM_PERIODIC), not the default 10: on
    this linear toy the default penalty outweighs the cross-entropy and every class keeps a near-zero proxy."""
    model = _block_model(_column_wave(2), gain=1.0)
    x, y = _block_images(80)
    ps = synthesize_proxies(model, x, y, 4, steps=150, seed=0, families=FAMILIES, lam_periodic=TOY_LAM_PERIODIC)
    assert list(ps.patterns) == list(FAMILIES)
    z = ps.z_scores("periodic")
    assert int(z.argmax()) == TARGET and float(z[TARGET]) >= 2.0
    assert float(ps.z_scores("additive")[TARGET]) < 2.0
    s = ps.proxy("periodic", TARGET)
    assert s.mask is None
    spectrum = torch.fft.rfft(s.pattern[0].mean(0)).abs()  # over the columns, rows averaged: [5] (0..4 cycles)
    assert int(spectrum[1:].argmax()) + 1 == 2
    other = y != TARGET
    assert (model(s.apply(x[other])).argmax(1) == TARGET).float().mean() > 0.9


def test_without_a_backdoor_no_class_of_the_periodic_family_stands_far_out():
    x, y = _block_images(80)
    ps = synthesize_proxies(_block_model(), x, y, 4, steps=150, seed=0, families=FAMILIES,
                            lam_periodic=TOY_LAM_PERIODIC)
    norms = ps.norms["periodic"]
    assert float(norms.max() / norms.min()) < 1.5


def test_the_patch_and_additive_proxies_are_unchanged_by_the_periodic_and_blend_ones():
    """The periodic and blend families have their own parameters and random streams (the periodic its own Adam
    group): the patch and additive proxies are the same with or without them."""
    x, y = _block_images(40)
    model = _block_model()
    two = synthesize_proxies(model, x, y, 4, steps=20, seed=3, families=("patch", "additive"))
    for more in (("patch", "additive", "periodic"), ("patch", "additive", "blend"), FAMILIES):
        every = synthesize_proxies(model, x, y, 4, steps=20, seed=3, families=more)
        assert list(every.patterns) == list(more)
        assert torch.allclose(two.masks, every.masks, atol=1e-6)
        for f in ("patch", "additive"):
            assert torch.allclose(two.patterns[f], every.patterns[f], atol=1e-6), (more, f)


def _picture(seed: int = 7) -> torch.Tensor:
    """[1, 8, 8]: a fixed random picture in [0, 1) (a blended trigger's), zero on the blocks' pixels."""
    p = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(seed))
    for c in range(4):
        p[:, _block(c)[0], _block(c)[1]] = 0.0
    return p


def test_the_blend_family_finds_a_planted_blend_backdoor_and_its_picture():
    """Planted: the target logit also reads a fixed random picture (centred), so mixing that picture into any
    image sends it to the target. Must find: the blend family's smallest strength is on the target, clearly
    anomalous; its pattern correlates with the planted picture; its stamp flips other classes to the target.
    The optimisation is fixed here (150 steps of 24 images at lr 0.1): with 4 classes the MAD of the 3 others is
    noisy, and at the repair defaults (batch 12, lr 0.2) the target keeps the smallest strength but its index
    swings with the step count (docs/design.md, "Repair time")."""
    pic = _picture()
    centred = (pic - pic[pic > 0].mean()) * (pic > 0)
    model = _block_model(centred, gain=2.0)
    x, y = _block_images(80)
    ps = synthesize_proxies(model, x, y, 4, steps=150, batch=24, lr=0.1, seed=0, families=("blend",))
    z = ps.z_scores("blend")
    assert int(z.argmax()) == TARGET and float(z[TARGET]) >= 2.0
    s = ps.proxy("blend", TARGET)
    assert s.mask is None and 0.0 < s.strength < 1.0 and s.strength == pytest.approx(float(ps.norms["blend"][0]))
    off = pic > 0
    corr = torch.corrcoef(torch.stack([s.pattern[off], pic[off]]))[0, 1]
    assert float(corr) > 0.5
    other = y != TARGET
    assert (model(s.apply(x[other])).argmax(1) == TARGET).float().mean() > 0.9


def test_without_a_backdoor_no_class_of_the_blend_family_stands_far_out():
    x, y = _block_images(80)
    ps = synthesize_proxies(_block_model(), x, y, 4, steps=150, seed=0, families=("blend",))
    norms = ps.norms["blend"]
    assert float(norms.max() / norms.min()) < 1.5


def test_purification_only_families_never_name_the_suspect():
    """detect (RepairConfig.purify_families on prepare's side): the blend family is synthesised beside the others
    and flags the planted blend backdoor, but only the detection families may name the suspect; the proxies are
    the same as without `detect`."""
    pic = _picture()
    model = _block_model((pic - pic[pic > 0].mean()) * (pic > 0), gain=2.0)
    x, y = _block_images(80)
    every = synthesize_proxies(model, x, y, 4, steps=150, batch=24, lr=0.1, seed=0,
                               families=("patch", "additive", "blend"))
    split = synthesize_proxies(model, x, y, 4, steps=150, batch=24, lr=0.1, seed=0,
                               families=("patch", "additive", "blend"),
                               detect=("patch", "additive"))
    assert every.suspect().family == "blend" and split.detect == ("patch", "additive")
    assert split.suspect().family in ("patch", "additive") and list(split.patterns) == ["patch", "additive", "blend"]
    for f in split.patterns:
        assert torch.equal(split.patterns[f], every.patterns[f])
    assert split.to("cpu").detect == split.detect
    cfg = RepairConfig(purify_families="blend,periodic").check()
    assert cfg.purify_families == ("periodic", "blend")
    kw = trigger_settings(cfg, x.shape)
    assert kw["families"] == ("patch", "additive", "periodic", "blend") and kw["detect"] == DEFAULT_FAMILIES
    assert RepairConfig().check().purify_families == DEFAULT_PURIFY_FAMILIES == ("periodic", "blend", "warp")

    def synthesised(cfg):
        return trigger_settings(cfg.check(), x.shape)["families"]

    assert synthesised(RepairConfig()) == FAMILIES  # the default: all five synthesised
    assert synthesised(RepairConfig(purify="none")) == DEFAULT_FAMILIES  # none unlearned
    assert synthesised(RepairConfig(purify_families=())) == DEFAULT_FAMILIES
    with pytest.raises(UserError, match="trigger families"):
        RepairConfig(purify_families="stripes").check()


def test_trigger_families_are_checked_and_put_in_order():
    assert check_families("periodic, patch") == ("patch", "periodic")
    assert check_families(["additive"]) == ("additive",)
    for bad in ("patch,wave", "", "patch,patch"):
        with pytest.raises(UserError, match="trigger families"):
            check_families(bad)


def test_stamp_and_sample_give_each_image_a_proxy_of_another_class():
    x, y = _block_images(40)
    every = synthesize_proxies(_block_model(), x, y, 4, steps=5, seed=0, families=FAMILIES)
    family = torch.arange(40) % len(FAMILIES)
    cls = (y + 1) % 4
    stamped = every.stamp(x, family, cls)
    for i in range(40):  # per image, the same as that (family, class)'s TriggerProxy, in every family
        p = every.proxy(FAMILIES[int(family[i])], int(cls[i]))
        assert torch.allclose(stamped[i], p.apply(x[i:i + 1])[0], atol=1e-6)
    assert not torch.allclose(stamped, x, atol=1e-3)
    ps = synthesize_proxies(_block_model(), x, y, 4, steps=5, seed=0, families=("patch", "additive"))
    ps.norms["patch"] = torch.tensor([1.0, 1.1, 0.9, 1.05])  # no class stands out (|z| < 2)
    ps.norms["additive"] = torch.tensor([0.01, 1.0, 1.1, 0.9])  # class 0 stands out (z about 6)
    g = torch.Generator().manual_seed(0)
    labels = torch.full((4000,), 2)
    fam, c = ps.sample(labels, g)
    assert not (c == labels).any()  # never the image's own class
    top = ((fam == 1) & (c == 0)).float().mean()
    assert top > 0.9  # the anomalous (family, class) gets nearly every copy
    assert ((fam == 0) | (c != 0)).any()  # ... but not all of them


def _many_class_task(classes: int, planted: bool, n: int = 240, seed: int = 0):
    """`classes` classes on 8x8 images: class c is its own random prototype plus noise, read by a linear
    classifier; planted: the TARGET logit also reads a 2x2 corner patch (a BadNets-like backdoor) -> (model,
    x [n, 1, 8, 8], y [n])."""
    g = torch.Generator().manual_seed(seed)
    proto = torch.randn(classes, 64, generator=g)
    proto = proto / proto.norm(dim=1, keepdim=True) * 3
    y = torch.arange(n) % classes
    x = (proto[y] + 0.3 * torch.randn(n, 64, generator=g)).reshape(n, 1, 8, 8)
    lin = nn.Linear(64, classes)
    with torch.no_grad():
        lin.weight.copy_(proto)
        lin.bias.zero_()
        if planted:
            corner = torch.zeros(1, 8, 8)
            corner[:, :2, :2] = 1.0
            lin.weight[TARGET] += 6.0 * corner.reshape(64)
    return nn.Sequential(nn.Flatten(), lin).eval(), x, y


def test_many_classes_are_screened_and_the_planted_target_is_refined_and_flagged():
    """Planted: 40 classes, a corner-patch backdoor to TARGET. With at most 8 classes optimised, the screen must
    rank TARGET first, the refined rows are its 4 leading candidates and 4 random reference classes, and the
    anomaly index against the reference flags TARGET; the proxies' tensors hold 8 rows, not 40."""
    model, x, y = _many_class_task(40, planted=True)
    from onp_fast.prepare.trigger import screen_classes
    scores = screen_classes(model, x, y, 40, steps=60, seed=0)
    assert int(scores.argmax()) == TARGET
    ps = synthesize_proxies(model, x, y, 40, steps=100, seed=0, max_classes=8)
    assert len(ps.classes) == 8 and ps.masks.shape[0] == 8 and int(ps.reference.sum()) == 4
    assert TARGET in ps.classes.tolist() and not bool(ps.reference[ps.row(TARGET)])
    s = ps.suspect()
    assert s.target == TARGET and s.anomaly_index >= 2.0
    ref = ps.norms["patch"][ps.reference]  # the index is measured against the random reference classes only
    med = ref.median()
    mad = torch.maximum((ref - med).abs().median(), 0.05 * med)
    assert torch.allclose(ps.z_scores("patch"), (med - ps.norms["patch"]) / (1.4826 * mad))
    other = y != TARGET
    assert (model(s.apply(x[other])).argmax(1) == TARGET).float().mean() > 0.9
    fam, rows = ps.sample(y, torch.Generator().manual_seed(0))
    assert not (ps.classes[rows] == y).any()  # a copy is never stamped towards its own class


def test_without_a_backdoor_the_screened_classes_do_not_stand_out():
    """The same 40-class task without the planted patch: whatever the screen picks, nothing is flagged."""
    model, x, y = _many_class_task(40, planted=False)
    ps = synthesize_proxies(model, x, y, 40, steps=100, seed=0, max_classes=8)
    assert max(ps.anomaly().values()) < 2.0


def test_with_few_classes_every_class_is_refined_as_before():
    """At most max_classes classes: no screen, every class is a row and its own reference (the proxies are those
    of a run that never heard of screening: rows = classes, the median over all)."""
    x, y = _block_images(40)
    ps = synthesize_proxies(_block_model(), x, y, 4, steps=5, seed=0, max_classes=4)
    assert ps.classes.tolist() == [0, 1, 2, 3] and bool(ps.reference.all())
    n = ps.norms["patch"]
    med = n.median()
    mad = torch.maximum((n - med).abs().median(), 0.05 * med.abs())
    assert torch.allclose(ps.z_scores("patch"), (med - n) / (1.4826 * mad))


def test_many_classes_are_screened_with_the_periodic_family_too():
    """The screen fits a universal periodic (and blend) proxy beside the others, and the refined set has every
    family."""
    model, x, y = _many_class_task(40, planted=True)
    ps = synthesize_proxies(model, x, y, 40, steps=30, seed=0, families=FAMILIES, max_classes=16)
    assert list(ps.patterns) == list(FAMILIES) and len(ps.classes) == 16
    assert ps.patterns["periodic"].shape == ps.patterns["additive"].shape


def test_the_warp_family_finds_a_planted_shift_backdoor():
    """Planted: the target logit also reads the column just right of every block, which a one-pixel shift of
    the image to the right lights up (a warp trigger, no new pixels). Must find: the warp family's smallest flow
    is the target's, clearly anomalous, it moves content to the right (sampling from the left: flow x < 0), and
    its stamp flips the other classes; the warp proxies are the same beside the patch and additive families
    (their own random stream); without the planted columns no class stands out."""
    planted = torch.zeros(1, 8, 8)
    for c in range(4):
        rows, cols = _block(c)
        planted[:, rows, cols.stop] = 1.0
    model = _block_model(planted, gain=2.0)
    x, y = _block_images(80)
    ps = synthesize_proxies(model, x, y, 4, steps=150, seed=0, families=("warp",))
    z = ps.z_scores("warp")
    assert int(z.argmax()) == TARGET and float(z[TARGET]) >= 2.0
    s = ps.proxy("warp", TARGET)
    assert s.mask is None and s.pattern.shape == (2, 8, 8) and float(s.pattern[0].mean()) < 0
    other = y != TARGET
    assert (model(s.apply(x[other])).argmax(1) == TARGET).float().mean() > 0.9
    beside = synthesize_proxies(model, x, y, 4, steps=150, seed=0, families=("patch", "additive", "warp"))
    assert torch.allclose(beside.patterns["warp"], ps.patterns["warp"], atol=1e-6)
    clean = synthesize_proxies(_block_model(), x, y, 4, steps=150, seed=0, families=("warp",))
    assert float(clean.z_scores("warp").max()) < 2.0


def test_a_warp_stamp_moves_every_pixel_by_its_flow():
    """A zero flow leaves the image as it is; a flow of one pixel in x (y) samples the next column (row), the
    edge repeated; ProxySet.stamp gives each image its row's warp, as TriggerProxy.apply does."""
    from onp_fast.prepare.trigger import _warp
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(_warp(x, torch.zeros(2, 8, 8)), x, atol=1e-6)
    right, down = torch.zeros(2, 8, 8), torch.zeros(2, 8, 8)
    right[0], down[1] = 1.0, 1.0
    assert torch.allclose(_warp(x, right)[..., :-1], x[..., 1:], atol=1e-5)
    assert torch.allclose(_warp(x, right)[..., -1], x[..., -1], atol=1e-6)
    assert torch.allclose(_warp(x, down)[..., :-1, :], x[..., 1:, :], atol=1e-5)
    xb, yb = _block_images(12)
    ps = synthesize_proxies(_block_model(), xb, yb, 4, steps=5, seed=0, families=("patch", "warp"))
    rows = torch.arange(12) % 4
    family = torch.ones(12, dtype=torch.long)  # "warp": the second family of this set
    stamped = ps.stamp(xb, family, rows)
    for i in range(12):
        assert torch.allclose(stamped[i], ps.proxy("warp", int(rows[i])).apply(xb[i:i + 1])[0], atol=1e-6)



def test_the_passes_that_take_gradients_run_channels_last_with_the_same_values(monkeypatch):
    """The trigger proxies', unlearning's and fine-tuning's forwards take their images in channels-last order (the
    faster one on a CPU for three channels; docs/design.md, "The trigger phase's cost at 32 x 32"): a hook on a
    three-channel conv model sees every such image in that order, and the proxies match those of a run left in
    NCHW up to float rounding. One channel, or a tensor that is not 4-d, comes back as it is. A user's model that
    flattens with `.view` after a convolution (which fails on channels-last activations) keeps NCHW images in all
    three passes, and the probe leaves its training mode as it was."""
    import copy

    from onp_fast import torchutil
    from onp_fast.groups import find_groups
    from onp_fast.prepare import finetune, trigger
    from onp_fast.prepare.unlearn import unlearn

    x1 = torch.rand(6, 1, 8, 8)
    flat = x1.flatten(1)
    assert torchutil.channels_last(x1) is x1 and torchutil.channels_last(flat) is flat
    x3 = torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cl = torchutil.channels_last(x3)
    assert torch.equal(cl, x3) and cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    y = torch.arange(40) % 4
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4)).eval()
    seen = []

    def look(_, args):
        if torch.is_grad_enabled():  # the passes that take gradients, not the accuracy checks
            seen.append(args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous())

    model[0].register_forward_pre_hook(look)
    fast = synthesize_proxies(model, x3, y, 4, steps=5, batch=6, seed=0)
    assert seen and all(seen)
    seen.clear()
    unlearn(model, x3, y, max_epochs=1, batch_size=16)
    tuned = copy.deepcopy(model)  # the hook comes along
    groups = find_groups(tuned, (3, 8, 8))
    finetune.finetune_pruned(tuned, groups, torch.zeros(groups.num_groups, dtype=torch.bool), x3, y, epochs=1,
                             batch_size=16)
    assert len(seen) >= 6 and all(seen)
    seen.clear()
    monkeypatch.setattr(trigger, "gradient_order", lambda *_: (lambda t: t))
    slow = synthesize_proxies(model, x3, y, 4, steps=5, batch=6, seed=0)
    assert seen and not any(seen)
    assert torch.allclose(slow.masks, fast.masks, atol=1e-5)
    for f in fast.patterns:
        assert torch.allclose(slow.patterns[f], fast.patterns[f], atol=1e-5)
    monkeypatch.undo()

    class Viewing(nn.Module):  # the older CIFAR code's flatten: a view of the conv's output
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).view(x.size(0), -1))

    user = Viewing().eval()
    with pytest.raises(RuntimeError):
        user(cl)
    assert torchutil.gradient_order(user, x3)(x3) is x3
    assert torchutil.gradient_order(model, x3) is torchutil.channels_last
    user.train()
    assert torchutil.gradient_order(user, x3)(x3) is x3 and user.training
    user.eval().conv.register_forward_pre_hook(look)
    seen.clear()
    synthesize_proxies(user, x3, y, 4, steps=2, batch=6, seed=0)
    unlearn(user, x3, y, max_epochs=1, batch_size=16)
    groups = find_groups(user, (3, 8, 8))
    finetune.finetune_pruned(user, groups, torch.zeros(groups.num_groups, dtype=torch.bool), x3, y, epochs=1,
                             batch_size=16)
    assert len(seen) >= 6 and not any(seen)
