"""The one torch.fx tracer of the package: attention blocks stay leaves, so heads remain visible."""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from ..errors import UserError


class Tracer(fx.Tracer):
    """torch.nn modules and attention blocks (anything with `num_heads`) stay leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return hasattr(m, "num_heads") or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """`model` traced symbolically (no input needed) -> a GraphModule sharing its parameters.
    UserError (one line) when torch.fx cannot trace it."""
    try:
        graph = Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many types
        raise UserError(f"cannot trace the model with torch.fx: {str(exc).splitlines()[0]}") from None
    return fx.GraphModule(model, graph)
