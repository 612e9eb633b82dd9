"""Loads the compiled extension onp_fast._C, which registers torch.ops.onp_fast.*."""
from __future__ import annotations

import functools

from .errors import UserError


@functools.lru_cache(maxsize=None)
def load():
    """Imports onp_fast._C once; raises UserError with build instructions when it is missing."""
    try:
        from . import _C  # noqa: F401
    except ImportError as exc:
        raise UserError(
            "the onp_fast C++ extension is not built "
            f"({exc}); build it with `make build` or `pip install --no-build-isolation -e .`"
        ) from None
    return _C


def built_with_cuda() -> bool:
    return bool(load().built_with_cuda)
