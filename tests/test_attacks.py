"""Attacks: trigger size, place and strength; seeding and JSON specs; which images get poisoned."""
import json
import math

import pytest
import torch

from onp_fast import attacks
from onp_fast.errors import UserError


def _images(n=6, shape=(3, 16, 16), seed=0):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed)) * 0.5  # never white


def test_registry_lists_the_four():
    assert {"badnets", "blended", "sig", "wanet"} <= set(attacks.names())


def test_unknown_attack_lists_valid_names():
    with pytest.raises(UserError, match="valid: .*badnets.*blended.*sig.*wanet"):
        attacks.build("nope", (3, 32, 32))


@pytest.mark.parametrize("side,expected", [(32, 3), (16, 2), (8, 1), (64, 6), (224, 21)])
def test_badnets_square_scales_with_image(side, expected):
    x = _images(2, (3, side, side))
    y = attacks.build("badnets", (3, side, side)).apply(x)
    changed = (y != x).any(dim=(0, 1))  # [H, W]
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert changed.sum() == expected * expected
    assert rows.min() == side - expected and rows.max() == side - 1  # bottom rows
    assert cols.min() == side - expected and cols.max() == side - 1  # right columns
    assert torch.all(y[:, :, -expected:, -expected:] == 1.0)  # white in every channel


def test_blended_is_a_fixed_seeded_20_percent_blend():
    x = _images()
    a = attacks.build("blended", (3, 16, 16), seed=3)
    p = a.pattern
    assert p.shape == (3, 16, 16) and p.min() >= 0 and p.max() <= 1
    torch.testing.assert_close(a.apply(x), 0.8 * x + 0.2 * p)
    assert torch.equal(attacks.build("blended", (3, 16, 16), seed=3).pattern, p)
    assert not torch.equal(attacks.build("blended", (3, 16, 16), seed=4).pattern, p)


def test_sig_adds_row_sinusoid_delta_40_f_6():
    shape = (3, 16, 32)
    x = torch.full((2, *shape), 0.5)
    y = attacks.build("sig", shape).apply(x)
    j = torch.arange(32, dtype=torch.float64)
    expected = (40 / 255) * torch.sin(2 * math.pi * j * 6 / 32)
    torch.testing.assert_close((y - x).double(), expected.expand(2, 3, 16, 32), atol=1e-6, rtol=0)
    # clipped to [0, 1]
    extremes = attacks.build("sig", shape).apply(torch.stack([torch.zeros(shape), torch.ones(shape)]))
    assert extremes.min() >= 0 and extremes.max() <= 1


def test_wanet_grid_stays_inside_unit_square_even_for_strong_warps():
    for s in (0.5, 50.0):
        a = attacks.build("wanet", (3, 16, 16), seed=1, s=s)
        assert a.grid.shape == (1, 16, 16, 2)
        assert a.grid.abs().max() <= 1.0
        noisy = a.noise_grid(8, torch.Generator().manual_seed(0))
        assert noisy.shape == (8, 16, 16, 2) and noisy.abs().max() <= 1.0
    strong = attacks.build("wanet", (3, 16, 16), seed=1, s=50.0)
    assert strong.grid.abs().max() == 1.0  # the clamp acted


def test_wanet_warp_strength_and_control_grid():
    a = attacks.build("wanet", (3, 16, 16), seed=2)
    ident = attacks.build("wanet", (3, 16, 16), seed=2, s=0.0)
    disp = (a.grid - ident.grid) * 16  # back to the control-grid scale times s
    # mean |grid| is 1 on the k x k control points; bicubic upsampling keeps it near 1
    assert 0.5 * 0.5 < disp.abs().mean() < 0.5 * 1.5
    x = _images()
    torch.testing.assert_close(ident.apply(x), x, atol=1e-5, rtol=0)  # s = 0 is the identity warp
    assert (a.apply(x) - x).abs().max() > 0.01


def test_wanet_noise_mode_transform():
    a = attacks.build("wanet", (3, 16, 16), seed=0)
    x = _images(40)
    y = torch.arange(40) % 10
    ps = a.poison_training_set(x, y, rate=0.1, target=0, generator=torch.Generator().manual_seed(0))
    assert ps.poisoned_index.numel() == 0 and torch.equal(ps.x, x)
    xb, yb = ps.transform(x, y, torch.Generator().manual_seed(1))
    assert torch.equal(xb[:4], a.apply(x[:4])) and torch.all(yb[:4] == 0)  # int(40 * 0.1) backdoored
    assert torch.equal(yb[4:], y[4:])  # cross samples keep labels
    assert not torch.equal(xb[4:12], x[4:12]) and not torch.equal(xb[4:12], a.apply(x[4:12]))  # 2x noise
    assert torch.equal(xb[12:], x[12:])
    assert torch.equal(x, _images(40))  # input untouched


@pytest.mark.parametrize("name", ["badnets", "blended", "sig", "wanet"])
def test_spec_round_trip_and_seeding(name):
    x = _images()
    a = attacks.build(name, (3, 16, 16), seed=7)
    spec = json.loads(json.dumps(a.spec()))
    b = attacks.from_spec(spec)
    assert b.spec() == a.spec()
    assert torch.equal(b.apply(x), a.apply(x))
    y = a.apply(x)
    assert y.shape == x.shape and y.dtype == x.dtype and y.min() >= 0 and y.max() <= 1


def test_wrong_image_shape_is_a_user_error():
    with pytest.raises(UserError, match="expected images"):
        attacks.build("badnets", (3, 16, 16)).apply(torch.rand(2, 3, 8, 8))


def test_dirty_label_poisoning_picks_non_target_images_and_relabels():
    x = _images(100)
    y = torch.arange(100) % 10
    a = attacks.build("badnets", (3, 16, 16))
    ps = a.poison_training_set(x, y, 0.1, target=3, generator=torch.Generator().manual_seed(0))
    idx = ps.poisoned_index
    assert idx.numel() == 10 and torch.all(y[idx] != 3)
    assert torch.all(ps.y[idx] == 3) and torch.equal(ps.x[idx], a.apply(x[idx]))
    rest = torch.ones(100, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(ps.x[rest], x[rest]) and torch.equal(ps.y[rest], y[rest])
    again = a.poison_training_set(x, y, 0.1, 3, torch.Generator().manual_seed(0))
    assert torch.equal(again.poisoned_index, idx)


def test_sig_poisons_only_target_class_and_keeps_labels():
    x = _images(200)
    y = torch.arange(200) % 10  # 20 per class
    a = attacks.build("sig", (3, 16, 16))
    ps = a.poison_training_set(x, y, 0.1, target=0, generator=torch.Generator().manual_seed(0))
    idx = ps.poisoned_index
    assert idx.numel() == 20 and torch.all(y[idx] == 0)  # 10% of 200, all from the target class
    assert torch.equal(ps.y, y)  # labels kept
    changed = (ps.x != x).flatten(1).any(1)
    assert torch.equal(torch.nonzero(changed).flatten(), idx)
    capped = a.poison_training_set(x, y, 0.5, target=0, generator=torch.Generator().manual_seed(0))
    assert capped.poisoned_index.numel() == 20  # capped by the 20 target-class images


def test_sig_trains_with_train_delta_and_attacks_with_delta():
    shape = (1, 8, 8)
    x = torch.full((20, *shape), 0.5)
    y = torch.arange(20) % 10
    a = attacks.build("sig", shape, delta=80 / 255, train_delta=40 / 255)
    assert attacks.from_spec(json.loads(json.dumps(a.spec()))).params() == a.params()
    ps = a.poison_training_set(x, y, 0.1, target=0, generator=torch.Generator().manual_seed(0))
    j = torch.arange(8, dtype=torch.float64)
    wave = torch.sin(2 * math.pi * j * 6 / 8).float()
    assert torch.allclose(ps.x[ps.poisoned_index] - 0.5, (40 / 255) * wave.expand(2, 1, 8, 8), atol=1e-6)
    assert torch.allclose(a.apply(x[:1]) - 0.5, (80 / 255) * wave.expand(1, 1, 8, 8), atol=1e-6)
    assert attacks.build("sig", shape).train_delta == 40 / 255  # default: train with the test strength
    with pytest.raises(UserError, match="train_delta must be in"):
        attacks.build("sig", shape, train_delta=0.0)


def test_poison_module_checks_rate_target_and_shape():
    from onp_fast import poison

    x, y = _images(20), torch.arange(20) % 10
    a = attacks.build("badnets", (3, 16, 16))
    for rate in (0.0, -0.5, 1.01):
        with pytest.raises(UserError, match=r"poison rate .* \(0, 1\]"):
            poison.poison_training_set(a, x, y, num_classes=10, rate=rate)
    for target in (-1, 10):
        with pytest.raises(UserError, match="outside the classes 0..9"):
            poison.poison_training_set(a, x, y, num_classes=10, target=target)
    with pytest.raises(UserError, match="built for images"):
        poison.poison_training_set(attacks.build("badnets", (3, 8, 8)), x, y, num_classes=10)
    full = poison.poison_training_set(a, x, y, num_classes=10, rate=1.0, target=0)
    assert full.poisoned_index.numel() == 18  # every non-target image
