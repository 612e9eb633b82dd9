"""bn_mask_relu[_] and reward_epilogue ops (C++ CPU, CUDA when present) against their PyTorch references,
plus torch.library.opcheck."""
from __future__ import annotations

import pytest
import torch

from onp_fast.ops.masked_forward import bn_mask_relu, bn_mask_relu_, reward_epilogue
from onp_fast.ops.reference import bn_mask_relu_reference, reward_epilogue_reference

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def operands(kx, k, shape, channels_last, with_index, seed=0, device="cpu", dtype=torch.float32):
    """x [kx, B, C, *S] of `dtype`, scale/shift [k, C] float32, index [k, C'] with -1 entries (or None)."""
    g = torch.Generator().manual_seed(seed)
    B, C, *S = shape
    x = torch.randn(kx, B, C, *S, generator=g).to(dtype)
    if channels_last:
        x = x.movedim(2, -1).contiguous().movedim(-1, 2)
    scale = torch.randn(k, C, generator=g)
    shift = torch.randn(k, C, generator=g)
    index = None
    if with_index:
        index = torch.stack([torch.randperm(C, generator=g)[: max(1, C // 2)] for _ in range(k)])
        index[:, -1] = -1
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dev(x), dev(scale), dev(shift), dev(index)


CASES = [(kx, k, shape, cl, idx, relu)
         for (kx, k) in [(1, 1), (1, 3), (3, 3)]
         for shape in [(2, 5, 4, 3), (3, 8), (2, 6, 1, 1)]
         for cl in [False, True]
         for idx in [False, True]
         for relu in [False, True]
         if not (cl and len(shape) == 2)]


# x's dtypes: float32, and the low-precision activations of torch.autocast (scale/shift stay float32).
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_matches_reference(out, want):
    """out (the op) against want (bn_mask_relu_reference), both of x's dtype. Low precision: both load x exactly
    into float32, compute x * scale + shift (+ ReLU) in float32 with the same two roundings (no FMA on the CPU)
    and round once to x's dtype, so they are bit-equal. float32: as tight as that, with slack for the last bit."""
    assert out.dtype == want.dtype
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(out, want), f"{out.dtype}: max |diff| {(out.float() - want.float()).abs().max().item()}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kx,k,shape,cl,idx,relu", CASES)
def test_bn_mask_relu_matches_reference(kx, k, shape, cl, idx, relu, dtype):
    x, scale, shift, index = operands(kx, k, shape, cl, idx, dtype=dtype)
    out = bn_mask_relu(x, scale, shift, index, relu)
    want = bn_mask_relu_reference(x, scale, shift, index, relu)
    assert out.dtype == dtype
    assert_matches_reference(out, want)
    if cl and shape[2:] != (1, 1):
        assert out.stride(2) == 1, "channels-last input must give a channels-last output"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_bn_mask_relu_inplace(cl, relu, dtype):
    x, scale, shift, _ = operands(3, 3, (2, 5, 4, 3), cl, False, dtype=dtype)
    want = bn_mask_relu_reference(x, scale, shift, None, relu)
    ptr = x.data_ptr()
    out = bn_mask_relu_(x, scale, shift, relu)
    assert out.data_ptr() == ptr and x.dtype == dtype
    assert_matches_reference(x, want)


def test_bn_mask_relu_rejects_bad_input():
    x, scale, shift, _ = operands(2, 2, (2, 5, 4, 3), False, False)
    with pytest.raises(RuntimeError, match="scale has"):
        bn_mask_relu(x, scale[:, :3], shift[:, :3])
    with pytest.raises(RuntimeError, match="first dim"):
        bn_mask_relu(x, scale[:1].repeat(3, 1), shift[:1].repeat(3, 1))
    with pytest.raises(RuntimeError, match="out of range"):
        bn_mask_relu(x, scale, shift, torch.tensor([[7], [0]]))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        bn_mask_relu(x.double(), scale, shift)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        bn_mask_relu_(x.double(), scale, shift)
    with pytest.raises(RuntimeError, match="scale/shift must be float32"):
        bn_mask_relu(x.bfloat16(), scale.bfloat16(), shift.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_reward_epilogue_matches_reference(dtype):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(5, 37, 10, generator=g) * 4).to(dtype)
    logits[0, 0] = 0  # an all-tie row: argmax is the first index, as in torch.argmax
    labels = torch.randint(0, 10, (37,), generator=g)
    got = reward_epilogue(logits, labels)
    want = reward_epilogue_reference(logits.double(), labels)
    assert torch.equal(got.correct, want[0])
    torch.testing.assert_close(got.ce_sum, want[1], rtol=1e-9, atol=1e-9)
    assert torch.equal(got.counts, want[2])
    torch.testing.assert_close(got.prob_sum, want[3], rtol=1e-9, atol=1e-9)
    assert got.ce_sum.dtype == torch.float64 and got.counts.sum().item() == 5 * 37
    assert got.prob_sum.dtype == torch.float64
    # the true-label probability is exp(-CE) per image: one hot row (label logit far above) gives ~1
    sure = torch.full((1, 1, 10), -30.0)
    sure[0, 0, 3] = 30.0
    assert reward_epilogue(sure, torch.tensor([3])).prob_sum.item() == pytest.approx(1.0)
    assert reward_epilogue(sure, torch.tensor([4])).prob_sum.item() == pytest.approx(0.0, abs=1e-20)


def test_reward_epilogue_rejects_bad_labels():
    with pytest.raises(RuntimeError, match="out of range"):
        reward_epilogue(torch.randn(2, 3, 4), torch.tensor([0, 4, 1]))
    with pytest.raises(RuntimeError, match="labels must be"):
        reward_epilogue(torch.randn(2, 3, 4), torch.tensor([0, 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cl,idx", [(False, False), (True, True)])
def test_opcheck_bn_mask_relu(cl, idx, dtype):
    x, scale, shift, index = operands(1, 3, (2, 5, 4, 3), cl, idx, dtype=dtype)
    torch.library.opcheck(torch.ops.onp_fast.bn_mask_relu.default, (x, scale, shift, index, True))
    x3, scale3, shift3, _ = operands(3, 3, (2, 5, 4, 3), cl, False, dtype=dtype)
    torch.library.opcheck(torch.ops.onp_fast.bn_mask_relu_.default, (x3, scale3, shift3, True))


def test_opcheck_reward_epilogue():
    logits, labels = torch.randn(3, 6, 5), torch.randint(0, 5, (6,))
    torch.library.opcheck(torch.ops.onp_fast.reward_epilogue.default, (logits, labels))


# CUDA vs the reference: nvcc may fuse x * scale + shift into one FMA (one float32 rounding fewer), so the float32
# results may differ in the last bit (atol covers cancellation near 0) and the low-precision roundings may then
# land on neighbouring values: one ulp of x's dtype, relative 2**-7 (bfloat16) or 2**-10 (float16).
CUDA_RTOL = {torch.float32: 1e-6, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@CUDA
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kx,k,shape,cl,idx,relu", CASES[::3])
def test_bn_mask_relu_cuda(kx, k, shape, cl, idx, relu, dtype):
    x, scale, shift, index = operands(kx, k, shape, cl, idx, device="cuda", dtype=dtype)
    out = bn_mask_relu(x, scale, shift, index, relu)
    assert out.dtype == dtype
    torch.testing.assert_close(out.cpu(), bn_mask_relu_reference(x, scale, shift, index, relu).cpu(),
                               rtol=CUDA_RTOL[dtype], atol=1e-6)
    y = x.clone() if kx == k and index is None else None
    if y is not None:
        bn_mask_relu_(y, scale, shift, relu)
        torch.testing.assert_close(y, out)


@CUDA
def test_reward_epilogue_cuda():
    logits, labels = torch.randn(7, 300, 10) * 3, torch.randint(0, 10, (300,))
    got = reward_epilogue(logits.cuda(), labels.cuda())
    want = reward_epilogue(logits, labels)
    assert torch.equal(got.correct.cpu(), want.correct) and torch.equal(got.counts.cpu(), want.counts)
    torch.testing.assert_close(got.ce_sum.cpu(), want.ce_sum, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(got.prob_sum.cpu(), want.prob_sum, rtol=1e-12, atol=1e-9)
    torch.library.opcheck(torch.ops.onp_fast.reward_epilogue.default, (logits.cuda(), labels.cuda()))
