"""The reward engine's memory budget: the size parser and the chunking rule live in onp_fast.memory (one place for
every layer); re-exported here for the engine and its callers."""
from __future__ import annotations

from ..memory import DEFAULT_MAX_MEMORY, chunk_size, format_bytes, parse_memory

__all__ = ["DEFAULT_MAX_MEMORY", "chunk_size", "format_bytes", "parse_memory"]
