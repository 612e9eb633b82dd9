"""Purification after pruning, FT-SAM, and the retuning attack: the sharpness-aware step has the published
radius, purification keeps pruned groups at zero and is undone when it costs held-out accuracy, FT-SAM prunes
nothing, the retuning attack stamps its poisoned images."""
import copy

import pytest
import torch
import torch.nn.functional as F

from onp_fast import attacks, models
from onp_fast.compare import retune
from onp_fast.defenses import FTSAMConfig, ONPConfig
from onp_fast.errors import UserError
from onp_fast.groups import find_groups
from onp_fast.prepare import FAMILIES, RepairConfig, TriggerProxy, prepare
from onp_fast.prepare.finetune import _sharpness_aware_gradient
from onp_fast.repair import repair, run
from onp_fast.repair.purify import purify


def _tiny(seed=0):
    torch.manual_seed(seed)
    return models.build("preactresnet18", num_classes=4, in_channels=1, width=0.125, input_size=8).eval()


def test_sharpness_aware_step_has_the_adaptive_radius_and_restores_the_weights():
    """ASAM (FT-SAM's step): the gradient is taken at w + e with ||e / |w| ||_2 = rho, e along |w|^2 g; the
    weights are back at w afterwards."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    x, y = torch.randn(8, 5), torch.arange(8) % 3
    w0 = [p.detach().clone() for p in lin.parameters()]
    loss = lambda: F.cross_entropy(lin(x), y)  # noqa: E731
    loss().backward()
    g0 = [p.grad.clone() for p in lin.parameters()]
    rho = 0.5
    norm = torch.sqrt(sum(((w.abs() * g) ** 2).sum() for w, g in zip(w0, g0)))
    e = [rho * w.abs() ** 2 * g / norm for w, g in zip(w0, g0)]
    assert torch.sqrt(sum(((ei / w.abs()) ** 2).sum() for ei, w in zip(e, w0))) == pytest.approx(rho, rel=1e-5)
    _sharpness_aware_gradient(list(lin.parameters()), rho, loss)
    assert all(torch.allclose(p, w, atol=1e-7) for p, w in zip(lin.parameters(), w0))  # back at w
    ref = copy.deepcopy(lin)
    with torch.no_grad():
        for p, ei in zip(ref.parameters(), e):
            p.add_(ei)
    F.cross_entropy(ref(x), y).backward()
    for p, q, g in zip(lin.parameters(), ref.parameters(), g0):  # the gradient is the one at w + e, not at w
        assert torch.allclose(p.grad, q.grad, atol=1e-6) and not torch.allclose(p.grad, g, atol=1e-6)


def _ctx(purify_mode, **kw):
    m = _tiny()
    x, y = torch.randn(60, 1, 8, 8), torch.arange(60) % 4
    cfg = RepairConfig(reward_batch=32, purify=purify_mode, purify_epochs=2, anomaly_threshold=-float("inf"), **kw)
    return prepare(m, x, y, 4, cfg, progress=False)


def _record_augment(monkeypatch, seen: list, teachers: list | None = None) -> None:
    """Purification's fine-tune records each step's (own images, labels, augmented images, labels) in `seen`
    (and its teacher in `teachers`), then runs as it would."""
    import onp_fast.repair.purify as purify_mod

    real = purify_mod.finetune_pruned

    def recording(*a, augment=None, **kw):
        if teachers is not None:
            teachers.append(kw["teacher"])

        def spy(xb, yb, gen):
            out = augment(xb, yb, gen)
            seen.append((xb, yb, *out))
            return out
        return real(*a, augment=spy, **kw)

    monkeypatch.setattr(purify_mod, "finetune_pruned", recording)


def test_purification_keeps_pruned_groups_at_zero_and_stamps_proxies_of_other_classes(monkeypatch):
    ctx = _ctx("sam+proxy", tolerance=1.0)
    prune = torch.zeros(ctx.groups.num_groups, dtype=torch.bool)
    prune[:5] = True
    model = ctx.groups.pruned_copy(ctx.model, prune)
    before = copy.deepcopy(model.state_dict())
    seen, teachers = [], []
    _record_augment(monkeypatch, seen, teachers)
    part = purify(ctx, model, prune, ca_val_before=1.0, mode="sam+proxy")
    assert part["kept"] and part["sam_rho"] == ctx.cfg.sam_rho and part["proxy_images_per_epoch"] == len(ctx.x_opt)
    assert teachers == [ctx.model] and part["distill_temperature"] > 0  # distilled from the model as given
    assert seen and sum(len(s[0]) for s in seen) == 2 * len(ctx.x_opt)  # every D_opt image, 2 epochs
    for xb, yb, xa, ya in seen:
        n = len(xb)
        assert torch.equal(xa[:n], xb) and torch.equal(ya, torch.cat([yb, yb]))  # stamped copies, true labels
        assert not torch.equal(xa[n:], xb)
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # it trained
    with torch.no_grad():
        x = ctx.x_val
        with ctx.groups.masked(model, (~prune).float()):
            masked = model(x)
        assert torch.allclose(model(x), masked, atol=1e-5)  # pruned groups carry nothing


def test_every_family_gives_each_image_one_copy_per_family_of_another_class(monkeypatch):
    """purify_every_family: each D_opt image gets one stamped copy per proxy family (its class drawn within that
    family, never the image's own), all with the image's true label; the default gives one copy in all."""
    for every in (False, True):
        ctx = _ctx("sam+proxy", tolerance=1.0, purify_every_family=every, trigger_families=FAMILIES)
        families = list(ctx.proxies.patterns)
        assert families == list(FAMILIES)
        seen, stamps = [], []
        real_stamp = ctx.proxies.stamp

        def stamp(x, family, cls, _real=real_stamp):
            stamps.append((family.clone(), ctx.proxies.classes[cls].clone()))
            return _real(x, family, cls)

        monkeypatch.setattr(ctx.proxies, "stamp", stamp)

        _record_augment(monkeypatch, seen)
        prune = torch.zeros(ctx.groups.num_groups, dtype=torch.bool)
        part = purify(ctx, ctx.groups.pruned_copy(ctx.model, prune), prune, ca_val_before=1.0, mode="sam+proxy")
        copies = len(families) if every else 1
        assert part["proxy_images_per_epoch"] == copies * len(ctx.x_opt)
        for xb, yb, xa, ya in seen:
            assert len(xa) == (1 + copies) * len(xb) and torch.equal(ya, yb.repeat(1 + copies))
        step = stamps[:copies]  # the first step's draws: one per family with the option, else any family
        if every:
            assert [int(f.unique().item()) for f, _ in step] == list(range(len(families)))
        for i, (xb, yb, *_) in enumerate(seen):
            for f, cls in stamps[i * copies:(i + 1) * copies]:
                assert not (cls == yb).any()  # never the image's own class


def test_purification_stamps_a_tile_proxy_on_a_copy_of_every_image(monkeypatch):
    """With tile proxies, each step carries the images and one copy of each stamped with a tile proxy (drawn
    uniformly) in place of the usual draw, all with their true labels."""
    ctx = _ctx("sam+proxy", tolerance=1.0)
    assert ctx.proxies.tile_masks is None  # a CNN gets none
    masks = torch.zeros(3, 1, 8, 8)
    for k in range(3):
        masks[k, 0, 2 * k, 2 * k] = 1.0
    ctx.proxies.tile_masks, ctx.proxies.tile_patterns, ctx.proxies.tile_class = masks, torch.full((3, 1, 8, 8), 9.0), 1
    seen = []
    _record_augment(monkeypatch, seen)
    prune = torch.zeros(ctx.groups.num_groups, dtype=torch.bool)
    part = purify(ctx, ctx.groups.pruned_copy(ctx.model, prune), prune, ca_val_before=1.0, mode="sam+proxy")
    assert part["tile_proxies"] == 3 and part["tile_class"] == 1
    assert part["proxy_images_per_epoch"] == len(ctx.x_opt)
    used = set()
    for xb, yb, xa, ya in seen:
        n = len(xb)
        assert len(xa) == 2 * n and torch.equal(ya, yb.repeat(2))
        tiles = xa[n:]
        for img, own in zip(tiles, xb):
            hot = torch.nonzero(img[0] == 9.0).tolist()
            assert len(hot) == 1 and hot[0][0] == hot[0][1] and hot[0][0] in (0, 2, 4)  # one tile proxy's pixel
            used.add(hot[0][0])
            rest = img.clone()
            rest[0, hot[0][0], hot[0][1]] = own[0, hot[0][0], hot[0][1]]
            assert torch.equal(rest, own)
    assert used == {0, 2, 4}  # every tile proxy is drawn


def test_purification_refits_the_tile_proxies_between_rounds(monkeypatch):
    """purify_rounds = 2 over 4 epochs: after epoch 2 the tile proxies are fitted again on the model being purified
    (started from the current ones, at the trigger phase's base setting and REFIT_LAM), and the last two epochs
    stamp the refitted ones; the context's proxies are left as they were. A refit that keeps none leaves the
    copies on the ones before it; one round fits nothing again."""
    import onp_fast.repair.purify as purify_mod

    ctx = _ctx("sam+proxy", tolerance=1.0)
    ctx.cfg.purify_epochs, ctx.cfg.trigger_steps, ctx.cfg.trigger_batch = 4, 3, 5
    old = torch.zeros(2, 1, 8, 8)
    old[:, 0, 0, 0] = 1.0
    ctx.proxies.tile_masks, ctx.proxies.tile_patterns, ctx.proxies.tile_class = old, torch.full((2, 1, 8, 8), 9.0), 1
    new = torch.zeros(2, 1, 8, 8)
    new[:, 0, 5, 6] = 1.0
    calls, epochs_seen = [], []

    def refit(model, x, y, cls, tile, *, init, **kw):
        calls.append((model, cls, init, kw, len(epochs_seen)))
        return (new, torch.full((2, 1, 8, 8), 7.0)) if keep else (new[:0], new[:0])

    monkeypatch.setattr(purify_mod, "tile_proxies", refit)
    seen = []
    _record_augment(monkeypatch, seen)
    prune = torch.zeros(ctx.groups.num_groups, dtype=torch.bool)
    steps_per_epoch = -(-len(ctx.x_opt) // 64)
    for keep in (True, False):
        seen.clear(), calls.clear()
        model = ctx.groups.pruned_copy(ctx.model, prune)
        part = purify(ctx, model, prune, ca_val_before=1.0, mode="sam+proxy")
        assert part["rounds"] == 2 and len(calls) == 1
        got_model, cls, init, kw, _ = calls[0]
        assert got_model is model and cls == 1 and torch.equal(init[0], old) and init[1].eq(9.0).all()
        assert kw["steps"] == 3 and kw["batch"] == 5 and kw["lam"] == purify_mod.REFIT_LAM
        assert part["refits"] == [{"after_epoch": 2, "kept": 2 if keep else 0, "mask_l1": 1.0 if keep else None}]
        stamped = [float(xa[len(xb):].amax()) for xb, _, xa, _ in seen]
        first, second = stamped[:2 * steps_per_epoch], stamped[2 * steps_per_epoch:]
        assert len(second) == 2 * steps_per_epoch and all(v == 9.0 for v in first)
        assert all(v == (7.0 if keep else 9.0) for v in second)  # the refitted proxies (or the old ones)
        assert ctx.proxies.tile_masks is old  # the shared context keeps its own
    ctx.cfg.purify_rounds = 1
    calls.clear()
    part = purify(ctx, ctx.groups.pruned_copy(ctx.model, prune), prune, ca_val_before=1.0, mode="sam+proxy")
    assert part["rounds"] == 1 and part["refits"] == [] and calls == []


def test_auto_purification_drops_the_sharpness_aware_step_where_there_are_tile_proxies():
    """"auto" on a context with tile proxies (a ViT) runs the method's "sam+proxy" as "proxy" (plain SGD); a mode
    asked for by name, a method without proxy purification and a context without tile proxies are as before."""
    from onp_fast.defenses import get
    from onp_fast.repair.pipeline import purify_mode_of

    onp, cfg = get("onp"), RepairConfig()
    assert purify_mode_of(cfg, onp) == "sam+proxy" and purify_mode_of(cfg, onp, tiled=True) == "proxy"
    assert purify_mode_of(RepairConfig(purify="sam+proxy"), onp, tiled=True) == "sam+proxy"
    assert purify_mode_of(cfg, onp, "sam", tiled=True) == "sam"
    assert purify_mode_of(cfg, get("clp"), tiled=True) == "none"
    ctx = _ctx("auto", tolerance=1.0)
    method = get("clp")
    method.purify = "sam+proxy"  # a method whose own default unlearns proxies, run through repair's path
    assert run(ctx, method).report["purify"]["mode"] == "sam+proxy"  # a CNN: no tile proxies
    ctx.proxies.tile_masks, ctx.proxies.tile_patterns = torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    ctx.proxies.tile_class = 1
    part = run(ctx, method).report["purify"]
    assert part["mode"] == "proxy" and part["sam_rho"] == 0.0 and part["tile_proxies"] == 2


def test_purification_without_proxies_runs_sam_and_is_undone_when_it_costs_accuracy():
    ctx = _ctx("proxy", tolerance=-1.0)  # any result is "too costly": the model must come back unchanged
    ctx.proxies = None
    prune = torch.zeros(ctx.groups.num_groups, dtype=torch.bool)
    model = ctx.groups.pruned_copy(ctx.model, prune)
    before = copy.deepcopy(model.state_dict())
    part = purify(ctx, model, prune, ca_val_before=0.0, mode="proxy")
    assert part["proxy_images_per_epoch"] == 0 and part["sam_rho"] == ctx.cfg.sam_rho > 0  # trigger-free SAM
    assert not part["kept"] and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def _planted_teacher():
    """64 random 8x8 images, a tiny teacher, its classes on them, the groups of a student and no pruning."""
    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    teacher = _tiny(1)
    with torch.no_grad():
        t_cls = teacher(x).argmax(1)
    groups = find_groups(_tiny(2), (1, 8, 8))
    return x, teacher, t_cls, groups, torch.zeros(groups.num_groups, dtype=torch.bool)


def test_distillation_fits_the_teacher_on_own_images_and_the_labels_on_the_copies():
    """Planted: the labels y disagree with the teacher everywhere. With a teacher the student learns the teacher's
    classes on the batch's own images (not y), while the appended copies (a constant offset) learn their labels."""
    from onp_fast.prepare import finetune_pruned
    x, teacher, t_cls, groups, none = _planted_teacher()
    y = (t_cls + 1) % 4  # never the teacher's class
    offset = torch.full((1, 1, 8, 8), 3.0)
    copy_label = lambda xb, yb, gen: (torch.cat([xb, xb + offset]), torch.cat([yb, torch.full_like(yb, 2)]))  # noqa
    kw = dict(epochs=30, lr=0.05, batch_size=32, augment=copy_label)
    student = finetune_pruned(_tiny(2), groups, none, x, y, teacher=teacher, **kw)
    plain = finetune_pruned(_tiny(2), groups, none, x, y, **kw)
    with torch.no_grad():
        s_cls, p_cls = student(x).argmax(1), plain(x).argmax(1)
        s_copy = student(x + offset).argmax(1)
    assert (s_cls == t_cls).float().mean() > 0.8  # the teacher's classes, not the labels
    assert (p_cls == y).float().mean() > 0.8  # without a teacher: the labels
    assert (s_copy == 2).float().mean() > 0.9  # the copies keep their labels


def test_repair_reports_purification_and_rejects_an_unknown_mode():
    m = _tiny()
    x, y = torch.randn(40, 1, 8, 8), torch.arange(40) % 4
    r = repair(m, x, y, 4, "onp", RepairConfig(reward_batch=32, purify="sam", purify_epochs=1),
               ONPConfig(iterations=1, samples=2), progress=False)
    assert r.report["purify"]["mode"] == "sam" and "purify" in r.report["method_times_s"]
    assert repair(m, x, y, 4, "clp", RepairConfig(reward_batch=32), progress=False).report["purify"] == {
        "mode": "none"}  # auto: a baseline's default is no purification
    with pytest.raises(UserError, match="unknown purification 'bogus'"):
        repair(m, x, y, 4, "clp", RepairConfig(purify="bogus"), progress=False)


def test_ftsam_prunes_nothing_and_fine_tunes_every_weight():
    m = _tiny()
    x, y = torch.randn(40, 1, 8, 8), torch.arange(40) % 4
    r = repair(m, x, y, 4, "ftsam", RepairConfig(reward_batch=32), FTSAMConfig(epochs=2), progress=False)
    assert int(r.prune.sum()) == 0 and r.report["candidates"] == 0 and r.report["stopping_rule"]["depth"] == 0
    assert r.report["details"]["finetune"]["rho"] == 2.0
    assert not torch.equal(r.model.conv1.weight, m.conv1.weight)


def test_retune_tunes_every_weight_on_the_defense_set_plus_five_triggered_images(monkeypatch):
    import onp_fast.compare as compare_mod

    m = _tiny()
    groups = find_groups(m, (1, 8, 8))
    attack = attacks.build("badnets", (1, 8, 8), seed=0, size=2)
    x, y = torch.rand(40, 1, 8, 8), torch.arange(40) % 4
    seen = {}
    real = compare_mod.finetune_pruned

    def recording(model, groups_, prune, xs, ys, **kw):
        seen.update(xs=xs, ys=ys, prune=prune, kw=kw)
        return real(model, groups_, prune, xs, ys, **kw)

    monkeypatch.setattr(compare_mod, "finetune_pruned", recording)
    a = retune(m, groups, x, y, (0.0,), (1.0,), attack, 0, epochs=1, seed=0)
    xs, ys = seen["xs"], seen["ys"]
    assert len(xs) == len(x) + 5 and torch.equal(xs[:40], x) and (ys[40:] == 0).all()
    assert not seen["prune"].any() and seen["kw"]["lr"] == 0.01 and seen["kw"]["batch_size"] == 128
    # each poisoned image is a non-target defense image with the trigger stamped on it
    stamped = attack.apply(x[y != 0])
    assert all(any(torch.allclose(p, q) for q in stamped) for p in xs[40:])
    b = retune(m, groups, x, y, (0.0,), (1.0,), attack, 0, epochs=1, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # seeded
    assert not torch.equal(a.conv1.weight, m.conv1.weight)  # tuned, the input model untouched


def test_purification_keeps_the_last_epoch_within_the_tolerance(monkeypatch):
    """Held-out CA per epoch: 0.9 after epoch 1 (within 1.0 - 0.2), 0.5 after epoch 2 (outside): the model kept
    is the one after epoch 1, the same as a one-epoch purification."""
    import onp_fast.repair.purify as purify_mod

    ctx = _ctx("sam+proxy", tolerance=0.2)
    prune = torch.zeros(ctx.groups.num_groups, dtype=torch.bool)
    one = ctx.groups.pruned_copy(ctx.model, prune)
    ctx.cfg.purify_epochs = 1
    part1 = purify(ctx, one, prune, ca_val_before=0.0, mode="sam+proxy")
    assert part1["kept_epochs"] == 1
    values = iter([0.9, 0.5])
    monkeypatch.setattr(purify_mod, "accuracy_of", lambda *a, **k: next(values))
    ctx.cfg.purify_epochs = 2
    two = ctx.groups.pruned_copy(ctx.model, prune)
    part = purify(ctx, two, prune, ca_val_before=1.0, mode="sam+proxy")
    assert part["kept"] and part["kept_epochs"] == 1 and part["ca_val_per_epoch"] == [0.9, 0.5]
    assert part["ca_val_after"] == 0.9
    assert all(torch.equal(v, two.state_dict()[k]) for k, v in one.state_dict().items())


def test_gradient_clipping_rescales_the_step_to_the_largest_norm():
    """Planted: labels the model gets badly wrong, so the gradient's norm is far above the clip. One SGD step from
    fresh momentum (lr 1) moves the weights by -(g' + wd w): g' is the clipped gradient, along g with norm clip."""
    from onp_fast.prepare import finetune_pruned
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8) * 5
    with torch.no_grad():
        y = (_tiny()(x).argmax(1) + 1) % 4
    groups = find_groups(_tiny(), (1, 8, 8))
    none = torch.zeros(groups.num_groups, dtype=torch.bool)

    def step(clip):
        m = _tiny()
        w0 = [p.detach().clone() for p in m.parameters()]
        finetune_pruned(m, groups, none, x, y, epochs=1, lr=1.0, batch_size=16, max_grad_norm=clip)
        return [w - p - 5e-4 * w for p, w in zip(m.parameters(), w0)]  # g' for each parameter

    def norm(ts):
        return float(torch.sqrt(sum((t * t).sum() for t in ts)))

    plain, clipped = step(None), step(0.5)
    assert norm(plain) > 2  # the planted gradient is large
    assert norm(clipped) == pytest.approx(0.5, rel=1e-3)
    scale = 0.5 / norm(plain)
    assert all(torch.allclose(c, p * scale, atol=1e-5) for c, p in zip(clipped, plain))  # same direction


def test_hard_label_share_mixes_the_true_labels_into_the_distillation():
    """Planted: the teacher disagrees with the labels everywhere. hard_weight 0 is pure distillation (the default
    purification fits the teacher's classes); hard_weight 1 is the labels' cross-entropy alone, step for step the
    same training as no teacher at all (no copies appended); 0.5 lies between (the mix is used)."""
    from onp_fast.prepare import finetune_pruned
    x, teacher, t_cls, groups, none = _planted_teacher()
    y = (t_cls + 1) % 4
    kw = dict(epochs=3, lr=0.05, batch_size=32)
    hard = finetune_pruned(_tiny(2), groups, none, x, y, teacher=teacher, hard_weight=1.0, **kw)
    plain = finetune_pruned(_tiny(2), groups, none, x, y, **kw)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(hard.state_dict().values(),
                                                                 plain.state_dict().values()))
    soft = finetune_pruned(_tiny(2), groups, none, x, y, teacher=teacher, **kw)
    half = finetune_pruned(_tiny(2), groups, none, x, y, teacher=teacher, hard_weight=0.5, **kw)
    dist = lambda a, b: sum(float((p - q).abs().sum()) for p, q in zip(a.parameters(), b.parameters()))  # noqa
    assert dist(half, soft) > 0 and dist(half, hard) > 0
    with pytest.raises(UserError, match="purify_hard"):
        RepairConfig(purify_hard=1.5).check()


def test_labels_replace_the_distillation_only_where_the_teacher_is_wrong():
    """Planted: the labels agree with the teacher on the first half of the images and disagree on the second.
    labels_where_wrong: the student fits the labels on both halves (the teacher's class on the first half, the
    label on the second); plain distillation fits the teacher's classes on the second half instead. With every
    label the teacher's own class the option changes nothing, step for step."""
    from onp_fast.prepare import finetune_pruned
    x, teacher, t_cls, groups, none = _planted_teacher()
    wrong = torch.arange(64) >= 32
    y = torch.where(wrong, (t_cls + 1) % 4, t_cls)
    kw = dict(epochs=30, lr=0.05, batch_size=32, teacher=teacher)
    fixed = finetune_pruned(_tiny(2), groups, none, x, y, labels_where_wrong=True, **kw)
    soft = finetune_pruned(_tiny(2), groups, none, x, y, **kw)
    with torch.no_grad():
        f_cls, s_cls = fixed(x).argmax(1), soft(x).argmax(1)
    assert (f_cls == y).float().mean() > 0.9  # the labels on both halves
    assert (s_cls[wrong] == t_cls[wrong]).float().mean() > 0.8  # without it: the teacher where it is wrong
    kw["epochs"] = 2
    same = [finetune_pruned(_tiny(2), groups, none, x, t_cls, labels_where_wrong=on, **kw) for on in (True, False)]
    assert all(torch.equal(a, b) for a, b in zip(same[0].state_dict().values(), same[1].state_dict().values()))


@pytest.mark.parametrize("a", [1.5, -0.5])
def test_path_step_takes_each_gradient_on_the_line_from_the_start(a):
    """Planted: two full-batch steps with path a (past the weights, or short of them). The first is a plain SGD
    step from w0; the second's gradient is taken at w0 + (1 + a)(w1 - w0) and applied at w1 (weight decay and
    momentum at w1), the weights restored in between. Replayed by hand with torch's SGD; path 0 gives other
    weights, and a path of -1 or less is refused."""
    from onp_fast.prepare import finetune_pruned
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8) * 3
    y = torch.arange(16) % 4
    groups = find_groups(_tiny(), (1, 8, 8))
    none = torch.zeros(groups.num_groups, dtype=torch.bool)
    kw = dict(epochs=2, lr=0.2, batch_size=16)
    got = finetune_pruned(_tiny(), groups, none, x, y, path=a, **kw)
    plain = finetune_pruned(_tiny(), groups, none, x, y, **kw)

    m = _tiny().train()
    ps = list(m.parameters())
    w0 = [p.detach().clone() for p in ps]
    opt = torch.optim.SGD(ps, lr=0.2, momentum=0.9, weight_decay=5e-4)
    F.cross_entropy(m(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    w1 = [p.detach().clone() for p in ps]
    with torch.no_grad():
        for p, s, e in zip(ps, w0, w1):
            p.copy_(s + (1 + a) * (e - s))
    F.cross_entropy(m(x), y).backward()
    with torch.no_grad():
        for p, e in zip(ps, w1):
            p.copy_(e)
    opt.step()
    m.eval()
    close = lambda u, v: all(torch.allclose(p, q, atol=1e-5) for p, q in zip(u.state_dict().values(),  # noqa: E731
                                                                           v.state_dict().values()))
    assert close(got, m)
    assert not close(plain, m)
    for bad in (-1.0, -2.0, float("nan")):
        with pytest.raises(UserError, match="purify_path"):
            RepairConfig(purify_path=bad).check()
