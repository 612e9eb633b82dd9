"""Options shared by the commands that load a user's checkpoint."""
from __future__ import annotations

import click


def checkpoint_options(f):
    """--arch (for checkpoints that do not record it) and --trust-pickle (the explicit trust flag)."""
    f = click.option("--trust-pickle", is_flag=True,
                     help="Allow loading pickled (non-weights-only) checkpoints: runs code from the file.")(f)
    return click.option("--arch", default=None, help="Architecture, for checkpoints that do not record it.")(f)
