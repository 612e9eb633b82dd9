"""Small torch helpers shared by every layer."""
from __future__ import annotations

import contextlib
import re

import torch
import torch.nn as nn

from .errors import UserError

DEVICES = "cpu, cuda or cuda:N"
DEFAULT_DEVICE = "cpu"


def done_training(params) -> None:
    """After a model's training: each of `params` stops requiring grad and drops its gradient (a copy of the
    weights no later step reads)."""
    for p in params:
        p.requires_grad_(False)
        p.grad = None


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
