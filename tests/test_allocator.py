"""`torchutil.keep_freed_memory`: glibc's malloc keeps large freed tensors' pages for the next allocation, which
the CLI turns on for every command (planted: five forwards of a conv net with 64 MB activations, page faults
counted, with and without it, each in its own process)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from onp_fast.torchutil import keep_freed_memory

PROBE = """
import resource, sys, torch
from onp_fast.torchutil import keep_freed_memory
applied = keep_freed_memory()
if sys.argv[1] == "return":  # kept first, then given back (the CLI under --max-memory)
    applied = keep_freed_memory(False)
torch.manual_seed(0)
conv = lambda c: torch.nn.Conv2d(c, 32, 3, padding=1)
net = torch.nn.Sequential(conv(1), torch.nn.ReLU(), conv(32), torch.nn.ReLU(), conv(32)).eval()
x = torch.randn(2048, 1, 16, 16)  # 64 MB activations: over glibc's largest mmap threshold
with torch.no_grad():
    net(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    total = sum(float(net(x).sum()) for _ in range(5))
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, total)
"""


def _faults(mode: str) -> tuple[bool, int, float]:
    """(applied, minor page faults over the five forwards, the summed outputs) in a fresh process: mode "keep"
    (keep_freed_memory()), "return" (then keep_freed_memory(False)) or "system" (ONP_FAST_MALLOC=system)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if mode == "system":
        env["ONP_FAST_MALLOC"] = "system"
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    return out[0] == "True", int(out[1]), float(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_activations_are_reused_instead_of_faulted_in_again():
    applied, kept, total_kept = _faults("keep")
    if not applied:
        pytest.skip("this libc has no mallopt (not glibc)")
    not_applied, system, total_system = _faults("system")
    given_back, returned, total_returned = _faults("return")
    assert not not_applied and given_back  # ONP_FAST_MALLOC=system leaves the allocator as it is
    assert system > 5 * 16384  # the system default maps (and faults in) activations afresh, forward after forward
    assert kept < system / 10  # kept: the heap's pages serve the next forward's activations
    assert returned > 10 * kept  # given back (--max-memory): freed pages leave the process again
    assert total_kept == total_system == total_returned  # the same results


def test_it_says_whether_it_applied(monkeypatch):
    monkeypatch.setenv("ONP_FAST_MALLOC", "system")
    assert keep_freed_memory() is False
    assert keep_freed_memory(False) is False
