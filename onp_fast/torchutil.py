"""Small torch helpers shared by every layer."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re

import torch
import torch.nn as nn

from .errors import UserError

DEVICES = "cpu, cuda or cuda:N"
DEFAULT_DEVICE = "cpu"
# glibc mallopt parameters; the values `keep_freed_memory` sets, and glibc's documented defaults (mallopt(3))
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_KEEP = ((_M_MMAP_THRESHOLD, 2**31 - 1), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 2**30))
_RETURN = ((_M_MMAP_THRESHOLD, 128 * 1024), (_M_TRIM_THRESHOLD, 128 * 1024), (_M_TOP_PAD, 128 * 1024))


def keep_freed_memory(keep: bool = True) -> bool:
    """keep: glibc's malloc serves large CPU tensors from its heap and keeps what they free for the next one,
    instead of mapping fresh pages (and faulting them in) for every activation and returning them on free; the
    process's peak resident memory grows by what the heap keeps (why, and by how much: docs/design.md, "The CPU
    allocator"). keep=False: freed memory goes back to the system at once (glibc's default thresholds, fixed),
    so the resident memory follows the live tensors (the CLI's choice under --max-memory). Only the allocator
    changes: every result stays bit for bit the same. Returns whether it was applied: not on a libc without
    mallopt (macOS, musl) or with ONP_FAST_MALLOC=system in the environment."""
    if os.environ.get("ONP_FAST_MALLOC", "") == "system":
        return False
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (_KEEP if keep else _RETURN))


PRECISIONS = ("float32", "bfloat16", "float16")


def check_precision(precision: str, device: str | torch.device) -> str:
    """precision (one of PRECISIONS) -> itself; UserError (one line) for another name, and for float16 on a CPU
    (CPU autocast runs float16 convolutions without hardware support: slower than float32)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "float16" and torch.device(device).type != "cuda":
        raise UserError("float16 precision needs a CUDA device: use bfloat16 on the CPU")
    return precision


def autocast(device: str | torch.device, precision: str = "float32"):
    """The context under which a model runs at `precision` on `device` (check_precision's names): float32 runs
    as is (a no-op context, every result bit for bit as without it); bfloat16 / float16 is torch.autocast, so
    convolutions and matrix products take that dtype while weights, masks' optimisers and reductions stay
    float32. Its weight cache is off: a training loop inside the block (purification) updates the weights in
    place, and autocast's cached low-precision copies would keep every later forward on the first weights."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, precision), cache_enabled=False)


def full_precision(device: str | torch.device):
    """Within the block autocast is off on `device` (a check whose decision must not depend on the precision)."""
    return torch.autocast(torch.device(device).type, enabled=False)


def done_training(params) -> None:
    """After a model's training: each of `params` stops requiring grad and drops its gradient (a copy of the
    weights no later step reads)."""
    for p in params:
        p.requires_grad_(False)
        p.grad = None


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """x [N, C, H, W] in channels-last memory order: the same values, the order whose convolutions a CPU runs
    fastest with gradients to take (trigger proxies, unlearning, fine-tuning; docs/design.md, "The trigger phase's
    cost at 32 x 32"). With one channel both orders are the same, and x comes back as it is; so does an x that is
    not 4-d."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def gradient_order(model: nn.Module, sample: torch.Tensor):
    """The memory order for `model`'s images in the passes that take gradients, as a function of a batch:
    `channels_last` when sample [n, C, H, W] has more than one channel and one channels-last image of it runs
    through `model` (probed once, without gradients, in eval mode, the model's mode restored), else `as_given`.
    A user's model that flattens with `.view` after a convolution fails on channels-last activations: it keeps
    its images as they come."""
    wide = sample.dim() == 4 and sample.shape[1] > 1 and len(sample) > 0
    return channels_last if wide and _runs_channels_last(model, sample[:1]) else as_given


def as_given(x: torch.Tensor) -> torch.Tensor:
    """x itself: the memory order a batch already has."""
    return x


def _runs_channels_last(model: nn.Module, image: torch.Tensor) -> bool:
    """Whether `model` takes image [1, C, H, W] in channels-last order without a RuntimeError (no gradients, eval
    mode; the model's mode is restored)."""
    training = model.training
    try:
        with torch.no_grad():
            model.eval()
            model(channels_last(image))
        return True
    except RuntimeError:
        return False
    finally:
        model.train(training)


@contextlib.contextmanager
def frozen(*modules: nn.Module):
    """Within the block no parameter of `modules` requires grad (gradients flow to other leaves only, e.g. masks
    or noise); each parameter's requires_grad flag is restored afterwards."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def check_device(spec: str | torch.device) -> torch.device:
    """"cpu", "cuda" or "cuda:N" -> torch.device, checked against this machine: UserError (one line) for another
    string, for CUDA when torch sees none (a CPU-only torch or no driver), and for an index past the device
    count."""
    text = str(spec).strip().lower()
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", text)
    if not match:
        raise UserError(f"unknown device {str(spec)!r}: use {DEVICES}")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {text!r}: CUDA is not available here (torch.cuda.is_available() is False; "
                            f"torch {torch.__version__}); use cpu")
        count = torch.cuda.device_count()
        index = int(match.group(1) or 0)
        if index >= count:
            raise UserError(f"device {text!r}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                            f"(cuda:0 to cuda:{count - 1})")
    return torch.device(text)
