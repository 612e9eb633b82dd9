"""Memory budget: parse sizes like "512MB" and pick how many masks run at once under a budget."""
from __future__ import annotations

import re

from ..errors import UserError

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_memory(value: int | float | str) -> int:
    """Bytes from an int or a string like "512MB", "1.5GiB", "800k" (decimal k/M/G, binary KiB/MiB/GiB)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise UserError(f"memory budget must be positive, got {value}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise UserError(f"bad memory size {value!r}: use e.g. 512MB, 2GB, 1.5GiB")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise UserError(f"memory budget must be positive, got {value!r}")
    return size


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def chunk_size(total: int, per_item: int, shared: int, budget: int) -> int:
    """How many of `total` items fit: shared + chunk * per_item <= budget; UserError when not even one."""
    room = budget - shared
    if room < per_item:
        raise UserError(f"max_memory {format_bytes(budget)} is too small: one mask needs "
                        f"{format_bytes(per_item + shared)} (raise max_memory)")
    return max(1, min(total, room // max(per_item, 1)))
