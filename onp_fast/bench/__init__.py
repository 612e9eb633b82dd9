"""The `onp-fast bench` runner: times each op against its reference on real shapes.

Each module named in CASE_MODULES (onp_fast.bench.<name>) exposes `cases(quick: bool) -> list[Case]`.
A case whose `baseline` names another impl of the same case name gets a speedup = baseline median / its median.
"""
from __future__ import annotations

import importlib
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..atomic import write_text

# Case modules under onp_fast.bench.
CASE_MODULES = ["graphs", "reward", "policy"]


@dataclass
class Case:
    """One timed call. name: the workload (shared by the impls compared); impl: which implementation;
    fn: runs it once (synchronising any device work); baseline: the impl it is compared with (None for the
    baseline itself); repeats: timed calls after one warm-up call; info: extra fields copied into the JSON entry."""

    name: str
    impl: str
    fn: Callable[[], object]
    baseline: str | None = None
    repeats: int = 5
    info: dict = field(default_factory=dict)


def collect(quick: bool, modules: Iterable[str] | None = None) -> list[Case]:
    """All cases of the given case modules (default: all of CASE_MODULES)."""
    out: list[Case] = []
    for name in CASE_MODULES if modules is None else modules:
        out.extend(importlib.import_module(f"{__name__}.{name}").cases(quick))
    return out


def run_cases(cases: list[Case], progress: Callable[[str], None] | None = None) -> list[dict]:
    """Times every case; returns JSON-ready entries (name, impl, median_s, min_s, repeats, baseline, speedup).

    The impls of one workload (same name) are timed interleaved, one call each per round, so that they see the
    same machine load; each gets one untimed warm-up call first.
    """
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(case.name, []).append(case)
    times: dict[int, list[float]] = {}
    for name, group in groups.items():
        if progress:
            progress(f"{name} ({', '.join(c.impl for c in group)})")
        for case in group:
            case.fn()
        for r in range(max(c.repeats for c in group)):
            for case in group:
                if r < max(1, case.repeats):
                    t0 = time.perf_counter()
                    case.fn()
                    times.setdefault(id(case), []).append(time.perf_counter() - t0)
    entries = []
    for case in cases:
        t = times[id(case)]
        entries.append({"name": case.name, "impl": case.impl, "median_s": statistics.median(t), "min_s": min(t),
                        "repeats": len(t), "baseline": case.baseline, **case.info})
    medians = {(e["name"], e["impl"]): e["median_s"] for e in entries}
    for e in entries:
        base = medians.get((e["name"], e["baseline"])) if e["baseline"] else None
        e["speedup"] = base / e["median_s"] if base and e["median_s"] > 0 else None
    return entries


def format_table(entries: list[dict]) -> str:
    """A plain-text table: name, impl, median_s, min_s, speedup vs the baseline impl, note (e.g. GFLOP/s)."""
    rows = [("name", "impl", "median_s", "min_s", "speedup", "note")]
    for e in entries:
        speed = f"{e['speedup']:.2f}x vs {e['baseline']}" if e.get("speedup") else "(baseline)"
        rows.append((e["name"], e["impl"], f"{e['median_s']:.4f}", f"{e['min_s']:.4f}", speed, e.get("note", "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def write_json(entries: list[dict], path) -> None:
    """Writes the entries as a JSON list, atomically."""
    write_text(path, json.dumps(entries, indent=2) + "\n")
