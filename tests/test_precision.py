"""Reduced precision (`RepairConfig.precision`, `repair --precision`): the policy's masks and purification run
under autocast at bfloat16; the trigger proxies, the depth rule (its scorer and standard error) and every
accuracy check at float32; bfloat16 rewards stay close to float32's on both backends."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from onp_fast.errors import UserError
from onp_fast import models
from onp_fast.groups import find_groups
from onp_fast.prepare import RepairConfig, prepare
from onp_fast.reward import MaskScorer, RewardWeights
from onp_fast.torchutil import autocast, check_precision, full_precision

from test_reward_backends import ARCHS, SIZE, Stamp, small_model

N = 64


def test_check_precision_names_the_bad_setting():
    assert check_precision("bfloat16", "cpu") == "bfloat16"
    assert check_precision("float32", "cpu") == "float32"
    with pytest.raises(UserError, match="unknown precision 'fp8'"):
        check_precision("fp8", "cpu")
    with pytest.raises(UserError, match="float16 precision needs a CUDA device"):
        check_precision("float16", "cpu")


def test_autocast_float32_changes_nothing_and_full_precision_turns_bfloat16_off():
    conv = nn.Conv2d(1, 2, 3)
    x = torch.randn(2, 1, 5, 5)
    with autocast("cpu", "float32"):
        assert conv(x).dtype == torch.float32
    with autocast("cpu", "bfloat16"):
        assert conv(x).dtype == torch.bfloat16
        with full_precision("cpu"):
            assert conv(x).dtype == torch.float32


def test_weights_updated_inside_the_block_reach_the_next_forward():
    """Purification trains inside the block: a weight changed in place must change the next low-precision
    forward (with autocast's weight cache on, the second forward reused the first weights' bfloat16 copy)."""
    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with autocast("cpu", "bfloat16"):
        before = lin(x)
        with torch.no_grad():
            lin.weight.add_(1.0)
        after = lin(x)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after.float(), lin(x), atol=0.1, rtol=0.02)


def _conv_dtypes(model: nn.Module) -> tuple[list, list]:
    """Hooks on every conv/linear of model recording the dtype of its output -> (the list, the handles)."""
    seen, handles = [], []
    for mod in model.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            handles.append(mod.register_forward_hook(lambda m, i, o: seen.append(o.dtype)))
    return seen, handles


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", ["engine", "hooks"])
def test_bfloat16_scores_masks_in_bfloat16_close_to_float32(arch, backend):
    """The masks of a call run at bfloat16 (every conv/linear output seen is bfloat16) and their CA_B and CA_T
    stay within a few images / 0.03 of float32's; the standard error runs at float32."""
    model = small_model(arch, 0)
    groups = find_groups(model, (3, SIZE, SIZE))
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(N, 3, SIZE, SIZE, generator=g), torch.arange(N) % 10
    prune = torch.rand(6, groups.num_groups, generator=g) < 0.05
    w = RewardWeights(ca_b=1.0, ca_t=1.0, ca_u=0.0, ca_p=0.0, sparsity=0.1)
    full = MaskScorer(groups, model, x, y, w, trigger=Stamp(), backend=backend).terms(prune)
    low = MaskScorer(groups, model, x, y, w, trigger=Stamp(), backend=backend, precision="bfloat16")
    seen, handles = _conv_dtypes(model)
    try:
        half = low.terms(prune)
        assert seen and set(seen) == {torch.bfloat16}
        seen.clear()
        low.standard_error(prune[0])
        assert seen and set(seen) == {torch.float32}
    finally:
        for h in handles:
            h.remove()
    assert (half["ca_b"] - full["ca_b"]).abs().max() <= 4 / N
    assert (half["ca_t"] - full["ca_t"]).abs().max() <= 0.03
    assert torch.equal(half["sparsity"], full["sparsity"])


def test_preparation_and_the_depth_rule_stay_float32_and_the_policy_scorer_takes_the_precision():
    """Under precision bfloat16: unlearning and the trigger proxies (a decision: which class is flagged) run at
    float32, the policy's scorer (D_opt) at bfloat16, the depth rule's (D_val) at float32."""
    torch.manual_seed(0)
    model = models.build("preactresnet18", num_classes=4, in_channels=1, width=0.125, input_size=8).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(60, 1, 8, 8, generator=g), torch.arange(60) % 4
    cfg = RepairConfig(precision="bfloat16", trigger_steps=2, unlearn_epochs=1, reward_batch=16)
    seen, handles = _conv_dtypes(model)
    try:
        ctx = prepare(model, x, y, 4, cfg, progress=False, copy_model=False)
        assert seen and set(seen) == {torch.float32}
        prune = torch.zeros(2, ctx.groups.num_groups, dtype=torch.bool)
        for on, want in (("opt", torch.bfloat16), ("val", torch.float32)):
            seen.clear()
            ctx.scorer(on)(prune)
            assert seen and set(seen) == {want}, on
    finally:
        for h in handles:
            h.remove()
