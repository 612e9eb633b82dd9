"""The `onp-fast` command line (Click). Each sub-command lives in its own module here.

Errors: a UserError, ValueError, OSError or click usage error prints one line `error: ...` and exits 2;
Ctrl-C exits 130; anything unexpected prints one line and exits 1 (ONP_FAST_DEBUG=1 shows the traceback).
"""
from __future__ import annotations

import importlib
import os
import signal
import sys

import click

from ..errors import UserError
from ..torchutil import keep_freed_memory

# Sub-command modules; each defines a click command named `command`.
_COMMAND_MODULES = [
    "info",
    "attack",
    "evaluate",
    "bench",
    "demo",
    "repair",
    "compare",
    "scan",
]


class _Group(click.Group):
    def main(self, *args, **kwargs):
        # Ctrl-C always interrupts, even when started from a shell that ignored SIGINT (a background job).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        keep_freed_memory()  # glibc: activations reuse the heap, not fresh pages (same results); not under --max-memory
        kwargs.setdefault("standalone_mode", True)
        try:
            return super().main(*args, standalone_mode=False, **{k: v for k, v in kwargs.items() if k != "standalone_mode"})
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:  # usage errors too: one line, not click's Usage/Try/Error block
            click.echo(f"error: {_one_line_text(exc.format_message())}", err=True)
            sys.exit(2 if isinstance(exc, click.UsageError) else exc.exit_code or 2)
        except click.exceptions.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except (UserError, ValueError, OSError) as exc:
            if os.environ.get("ONP_FAST_DEBUG") == "1":
                raise
            click.echo(f"error: {_one_line(exc)}", err=True)
            sys.exit(2)
        except Exception as exc:  # noqa: BLE001 - last resort: no traceback for users
            if os.environ.get("ONP_FAST_DEBUG") == "1":
                raise
            click.echo(f"error: {type(exc).__name__}: {_one_line(exc)} (ONP_FAST_DEBUG=1 for details)", err=True)
            sys.exit(1)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename:
        text = f"file not found: {exc.filename}"
    return _one_line_text(text)


def _one_line_text(text: str) -> str:
    return " ".join(text.split())


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onp-fast")
def main():
    """onp-fast: repair backdoored neural networks by optimized neuron pruning."""


for _name in _COMMAND_MODULES:
    main.add_command(importlib.import_module(f"{__name__}.{_name}").command)
