"""Small torch helpers shared by every layer."""
from __future__ import annotations

import contextlib

import torch.nn as nn


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
