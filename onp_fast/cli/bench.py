"""`onp-fast bench`: times each op against its reference on real shapes, prints a table, writes JSON."""
from __future__ import annotations

import time
from pathlib import Path

import click


@click.command("bench")
@click.option("--quick", is_flag=True, help="Fewer cases and repeats (under a minute).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the entries (name, impl, median_s, ...) as JSON to this file.")
@click.option("--only", multiple=True, metavar="MODULE",
              help="Run only this case module (repeatable; default: all of onp_fast.bench.CASE_MODULES).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch and the ops (default: torch's default).")
def command(quick: bool, json_path: str | None, only: tuple[str, ...], threads: int | None) -> None:
    """Time the C++/CUDA ops against their pure-PyTorch references."""
    from .. import bench
    from ..bench import collect, format_table, run_cases, write_json
    from ..errors import UserError

    unknown = [m for m in only if m not in bench.CASE_MODULES]
    if unknown:
        raise UserError(f"unknown bench module {unknown[0]!r}: choose from {', '.join(bench.CASE_MODULES)}")
    if json_path and not Path(json_path).resolve().parent.is_dir():
        raise UserError(f"output folder does not exist: {Path(json_path).parent}")
    if threads:
        import torch

        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    entries = run_cases(collect(quick, only or None), progress=lambda s: click.echo(f"timing {s}", err=True))
    click.echo(format_table(entries))
    if json_path:
        write_json(entries, json_path)
        click.echo(f"wrote {len(entries)} entries to {json_path}")
    click.echo(f"bench took {time.perf_counter() - t0:.1f} s", err=True)
