"""Tile proxies (onp_fast.prepare.trigger): a tiled model (a ViT's patch embedding) is recognised, the suspect
class gets a patch proxy started on each tile, each finds a planted backdoor reachable from any tile in its own
tile (purification's use of them: tests/test_purify.py)."""
import pytest
import torch
import torch.nn as nn

from onp_fast import models
from onp_fast.prepare import RepairConfig, synthesize_proxies
from onp_fast.prepare.context import trigger_settings
from onp_fast.prepare.trigger import MAX_TILES, TILE_FLIP, _patch, tile_proxies, tile_side, tile_starts

TARGET = 0
TILE = 4


class TiledToy(nn.Module):
    """8 x 8 images cut into four 4 x 4 tiles by a patch embedding. Logit c: the sum of the 2 x 2 block at
    offset (1, 1) of tile c (class c's own feature, at one place). With gain > 0, TARGET also gets gain x the
    brightest tile corner (offset (3, 3)) of any tile: a backdoor that any tile reaches."""

    def __init__(self, gain: float):
        super().__init__()
        self.embed = nn.Conv2d(1, 2, kernel_size=TILE, stride=TILE, bias=False)
        w = torch.zeros(2, 1, TILE, TILE)
        w[0, 0, 1:3, 1:3] = 1.0
        w[1, 0, 3, 3] = 1.0
        self.embed.weight.data.copy_(w)
        self.gain = gain

    def forward(self, x):
        t = self.embed(x)  # [B, 2, 2, 2]: per tile, its block sum and its corner
        backdoor = torch.zeros(len(x), 4, device=x.device)
        backdoor[:, TARGET] = self.gain * t[:, 1].flatten(1).amax(1)
        return t[:, 0].flatten(1) + backdoor


def _images(n: int = 160, seed: int = 0):
    """Class c is the 8 x 8 image with its tile's block bright, plus faint noise -> (x [n, 1, 8, 8], y [n])."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.1
    for c in range(4):
        r, col = divmod(c, 2)
        x[y == c, :, 4 * r + 1:4 * r + 3, 4 * col + 1:4 * col + 3] += 1.0
    return x, y


def test_tile_side_is_a_patch_embedding_and_nothing_else():
    assert tile_side(TiledToy(1.0)) == TILE
    assert tile_side(models.build("vit_small", num_classes=4, in_channels=1, width=0.17, input_size=16,
                                  depth=1)) == 4
    assert tile_side(models.build("preactresnet18", num_classes=4, in_channels=1, width=0.125, input_size=8)) is None
    assert tile_side(nn.Sequential(nn.Conv2d(3, 8, 7, stride=2, padding=3))) is None  # a ResNet stem
    assert tile_side(nn.Sequential(nn.Conv2d(3, 8, 4, stride=4, padding=1))) is None  # padded: overlapping tiles
    assert tile_side(nn.Sequential(nn.Conv2d(3, 8, 1))) is None
    assert tile_side(nn.Linear(4, 2)) is None
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(1, 2, TILE, stride=TILE)))
    assert tile_side(scripted) is None  # a scripted model's modules are not nn.Conv2d
    cfg = RepairConfig().check()
    assert trigger_settings(cfg, (1, 1, 8, 8), TiledToy(1.0))["tile"] == TILE
    assert trigger_settings(RepairConfig(tile_proxies=False).check(), (1, 1, 8, 8), TiledToy(1.0))["tile"] is None
    assert trigger_settings(cfg, (1, 1, 8, 8))["tile"] is None
    assert trigger_settings(cfg, (1, 1, 8, 8), TiledToy(1.0))["tile_fit"] is True
    assert trigger_settings(RepairConfig(purify="none").check(), (1, 1, 8, 8), TiledToy(1.0))["tile_fit"] is False


def test_tile_starts_cover_the_grid_and_spread_out_when_there_are_more_than_max_tiles():
    assert tile_starts(8, 8, 4) == [(0, 0), (0, 4), (4, 0), (4, 4)]
    assert tile_starts(10, 9, 4) == [(0, 0), (0, 4), (4, 0), (4, 4)]  # a partial tile has no start
    many = tile_starts(28, 28, 4)  # 49 tiles
    assert len(many) == MAX_TILES and many[0] == (0, 0) and many[-1] == (24, 24)
    assert len(set(many)) == MAX_TILES and many == sorted(many)


def test_each_tile_proxy_finds_the_planted_backdoor_in_its_own_tile():
    """The backdoor (one bright corner pixel in any tile) is far cheaper than a class's own 2 x 2 block, so the
    patch family names TARGET, and each of its four tile proxies puts its mask on the corner of the tile it
    started on (a proxy that drifts to one shared tile, or stays where it started, fails)."""
    x, y = _images()
    model = TiledToy(gain=6.0).eval()
    proxies = synthesize_proxies(model, x, y, 4, steps=40, batch=8, lr=0.2, families=("patch",), tile=TILE)
    assert int(proxies.z_scores("patch").argmax()) == TARGET and proxies.tile_class == TARGET
    assert proxies.tile_masks.shape == (4, 1, 8, 8) and proxies.tile_patterns.shape == (4, 1, 8, 8)
    for k, (i, j) in enumerate(tile_starts(8, 8, TILE)):
        m = proxies.tile_masks[k, 0]
        peak = divmod(int(m.argmax()), 8)
        assert peak == (i + 3, j + 3)  # the corner of its own tile
        assert float(m[i:i + TILE, j:j + TILE].sum()) > 0.5 * float(m.sum())
        other = x[y != TARGET]
        flips = (model(_patch(other, proxies.tile_masks[k], proxies.tile_patterns[k])).argmax(1) == TARGET)
        assert float(flips.float().mean()) >= TILE_FLIP
    plain = synthesize_proxies(model, x, y, 4, steps=40, batch=8, lr=0.2, families=("patch",))
    assert plain.tile_masks is None and plain.tile_class is None  # an untiled run has none
    unfitted = synthesize_proxies(model, x, y, 4, steps=40, batch=8, lr=0.2, families=("patch",), tile=TILE,
                                  tile_fit=False)  # scan's: the same patch family, no tile proxies
    assert unfitted.tile_masks is None and torch.equal(unfitted.masks, proxies.masks)
    moved = proxies.to("cpu")
    assert torch.equal(moved.tile_masks, proxies.tile_masks) and moved.tile_class == TARGET


def test_a_refit_starts_where_the_proxies_stand_and_follows_the_backdoor_when_the_model_changes():
    """init: with no step the proxies come back as given; the model's backdoor then moves from each tile's corner
    (3, 3) to its first pixel (0, 0) (as purification moves a model's weights), and a refit from the old proxies
    (at purification's penalty) puts each one's mask on the new pixel of its own tile and lets the old one go."""
    from onp_fast.repair.purify import REFIT_LAM

    x, y = _images()
    model = TiledToy(gain=6.0).eval()
    proxies = synthesize_proxies(model, x, y, 4, steps=40, batch=8, lr=0.2, families=("patch",), tile=TILE)
    init = (proxies.tile_masks, proxies.tile_patterns)
    same_m, same_p = tile_proxies(model, x, y, TARGET, None, steps=0, batch=8, lr=0.2, init=init)
    assert torch.allclose(same_m, init[0], atol=1e-3) and torch.allclose(same_p, init[1], atol=1e-3)
    with torch.no_grad():
        model.embed.weight[1].zero_()
        model.embed.weight[1, 0, 0, 0] = 1.0
    masks, _ = tile_proxies(model, x, y, TARGET, None, steps=100, batch=8, lr=0.2, lam=REFIT_LAM, init=init,
                            seed=1)
    assert len(masks) == 4
    for k, (i, j) in enumerate(tile_starts(8, 8, TILE)):
        assert divmod(int(masks[k, 0].argmax()), 8) == (i, j) and float(masks[k, 0, i, j]) > 0.9
        assert float(masks[k, 0, i + 3, j + 3]) < 0.1 < 0.9 < float(init[0][k, 0, i + 3, j + 3])  # the old one goes


def test_a_class_no_tile_proxy_reaches_gets_none():
    x, y = _images()
    proxies = synthesize_proxies(TiledToy(gain=0.0).eval(), x, y, 4, steps=1, batch=4, lr=0.2,
                                 families=("patch",), tile=TILE)
    assert proxies.tile_masks is None and proxies.tile_patterns is None and proxies.tile_class is None
    with pytest.raises(ValueError, match="no tile proxies"):
        proxies.stamp_tiles(x, torch.Generator())


def test_on_a_tiled_model_the_patch_family_alone_runs_on_for_tile_steps_times_the_steps():
    """Steps 1..S stamp every family (4 classes x 8 images x 2 families = 64 images), steps S+1..TILE_STEPS x S
    the patch family alone (32), then the tile proxies take TILE_STEPS x S steps of 4 tiles x 8 images (32)."""
    from onp_fast.prepare.trigger import TILE_STEPS

    x, y = _images()
    model = TiledToy(gain=6.0).eval()
    sizes = []
    model.register_forward_pre_hook(lambda mod, args: sizes.append(len(args[0])) if torch.is_grad_enabled() else None)
    steps = 5
    synthesize_proxies(model, x, y, 4, steps=steps, batch=8, lr=0.2, families=("patch", "additive"), tile=TILE)
    assert sizes.count(64) == steps
    assert sizes.count(32) == steps * (TILE_STEPS - 1) + steps * TILE_STEPS and len(sizes) == sizes.count(64) + \
        sizes.count(32)
    sizes.clear()
    synthesize_proxies(model, x, y, 4, steps=steps, batch=8, lr=0.2, families=("patch", "additive"))
    assert sizes == [64] * steps  # untiled: every family, `steps` steps, as before


def test_tile_proxies_run_at_full_effort_or_when_asked():
    from onp_fast.defenses import apply_params
    from onp_fast.prepare import with_effort

    shape = (1, 1, 16, 16)
    assert with_effort(RepairConfig(), [1.0], shape).tile_proxies is True
    assert with_effort(RepairConfig(), [0.5], shape).tile_proxies is False  # a short run stays short
    assert with_effort(RepairConfig(tile_proxies=True), [0.01], shape).tile_proxies is True
    assert with_effort(RepairConfig(tile_proxies=False), [1.0], shape).tile_proxies is False
    assert apply_params(["repair.tile_proxies=false"], ["onp"])[0].tile_proxies is False
    assert apply_params(["repair.tile_proxies=yes"], ["onp"])[0].tile_proxies is True
