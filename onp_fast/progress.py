"""Progress output on stderr for the long phases, so stdout carries only a command's results.

One helper for every phase: `bar(total, desc, enabled)` is the progress bar of a loop of `total` steps, and
`note(line)` prints a line (a phase's "[onp] name ...") above whatever bar is showing. A library loop takes a
plain `progress: bool = False` (off by default) and opens its own bar, since only the loop knows its step
count; callers pass on the flag they were given (DefenseContext.progress), never a global. Nothing here touches
an RNG or a tensor, so results are bit-identical with progress on or off.

    with bar(steps, "trigger proxies", progress) as b:
        for _ in range(steps):
            ...
            b.update(1)
"""
from __future__ import annotations

import sys

from tqdm import tqdm

MIN_STEPS = 2  # a loop of fewer steps gets no bar: it could not show an ETA before it ends


def bar(total: int, desc: str, enabled: bool, *, unit: str = "step") -> tqdm:
    """A progress bar of `total` steps labelled `desc` on stderr (sys.stderr as it is at the call, so a
    redirected or captured stderr gets it), showing done/total, elapsed<remaining (the ETA) and the rate.
    Shown exactly when `enabled` and total >= MIN_STEPS, whether or not stderr is a terminal (redrawn at most
    10 times a second on a terminal, once a second elsewhere, as in a log file); otherwise a
    disabled bar whose update/set_postfix/close do nothing. leave=False: closing it (or leaving its `with`
    block) erases it, so only the phase lines stay on screen. Advance it with `update(n)`."""
    show = bool(enabled) and total >= MIN_STEPS
    file = sys.stderr
    tty = bool(getattr(file, "isatty", lambda: False)())
    return tqdm(total=total, desc=desc, unit=unit, disable=not show, leave=False, file=file, dynamic_ncols=True,
                mininterval=0.1 if tty else 1.0)  # a log file gets a redraw a second at most


def note(line: str) -> None:
    """Writes `line` and a newline to stderr (as it is at the call), above any bar showing there, which is
    redrawn below it."""
    tqdm.write(line, file=sys.stderr)
