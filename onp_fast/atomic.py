"""Atomic file output: write to a temp file in the target's folder, then rename over the target; and the check
that a command's outputs clobber neither its inputs, nor each other, nor (without force) an existing file."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temp path beside `path`; on success renames it onto `path`, on any error removes it.

    An interrupted run (exception, Ctrl-C) never leaves a half-written `path`. The file gets the mode a plain
    open() would give (0o666 less the umask), not mkstemp's 0o600.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"output folder does not exist: {folder}")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_outputs(outputs: dict[str, str | os.PathLike | None], inputs: dict[str, str | os.PathLike | None],
                  force: bool = False) -> None:
    """Before any work: UserError (one line) when an output (name -> path; None: not written) is the same file
    as an input or as another output, its folder is missing or it is a folder, or it exists and not `force`."""
    seen: dict[str, str] = {}
    for name, path in inputs.items():
        if path is not None:
            seen[os.path.realpath(path)] = name
    for name, path in outputs.items():
        if path is None:
            continue
        real = os.path.realpath(path)
        if real in seen:
            raise UserError(f"{name} {path} is the same file as the {seen[real]}: choose another path")
        seen[real] = name
        target = Path(path)
        if target.is_dir():
            raise UserError(f"{name} {path} is a folder: give a file path")
        if not target.resolve().parent.is_dir():
            raise UserError(f"{name} folder does not exist: {target.parent}")
        if target.exists() and not force:
            raise UserError(f"{name} {path} exists: pass --force to replace it")
