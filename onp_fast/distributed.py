"""Scale-out of mask scoring and the trigger phase over torch.distributed ranks (started by `torchrun`).

Every rank runs the same seeded repair on the whole defense set; only the scoring of candidate masks and the
trigger phase's image passes (the class screen, the per-class search, the tile proxies) are split. The K masks
of one scoring call are cut into contiguous shares, one per rank, and the reward terms of every share are
all-gathered (`gather_rows`); the trigger phase's stamped images of each step, and the screen's scoring images,
are cut the same way and their gradients and sums all-reduced (`all_sum`).
So every rank holds what one process would have computed (up to the order of float sums) and takes the same
decisions. Outside a process group (the default) nothing here changes anything.
"""
from __future__ import annotations

import atexit
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import UserError


def world() -> tuple[int, int]:
    """(rank, world size) of the current process group; (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str = "cpu") -> tuple[int, int, str]:
    """Joins the process group that torchrun describes in the environment (WORLD_SIZE > 1; RANK, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT): gloo on the CPU, NCCL on CUDA, where each rank takes cuda:LOCAL_RANK when device
    is "cuda" (a device with an index is taken as given). Without WORLD_SIZE > 1, or when a group exists
    already, nothing is done. A group joined here is destroyed at interpreter exit (`leave`): left to the
    interpreter's teardown, gloo's worker threads abort the process. -> (rank, world size, the device this rank
    uses)."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        return world() + (device,)
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    cuda = str(device).startswith("cuda")
    if cuda and str(device) == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if cuda else "gloo")
    atexit.register(leave)
    return world() + (device,)


LEAVE_TIMEOUT = timedelta(seconds=30)  # how long a gloo rank waits at exit for the others (see `leave`)


def leave() -> None:
    """Destroys the current process group, if any (after a caller's own `destroy_process_group`, nothing). Under
    gloo the ranks first meet at a monitored barrier, so no rank tears its connections down while another still
    uses them; a rank whose peers do not arrive within LEAVE_TIMEOUT (one left on an error) leaves anyway."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "gloo" and world()[1] > 1:
        try:
            dist.monitored_barrier(timeout=LEAVE_TIMEOUT, wait_all_ranks=True)
        except RuntimeError:
            pass
    dist.destroy_process_group()


def share(k: int, rank: int, size: int) -> slice:
    """The contiguous rows of k that `rank` of `size` scores: the first k % size ranks take one more."""
    base, extra = divmod(k, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def gather_rows(parts: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """{name: [k_r] float32 on the CPU}, this rank's share of k rows (`share`) -> {name: [k]} on every rank, the
    shares in rank order. Every rank passes the same names."""
    rank, size = world()
    if size == 1:
        return parts
    nccl = dist.get_backend() == "nccl"
    longest = share(k, 0, size).stop  # rank 0's share is never shorter than another's
    out = {}
    for name in sorted(parts):
        mine = torch.zeros(longest, dtype=torch.float32)
        mine[:len(parts[name])] = parts[name].float().cpu()
        if nccl:
            mine = mine.cuda()
        every = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(every, mine)
        out[name] = torch.cat([every[r][:share(k, r, size).stop - share(k, r, size).start].cpu()
                               for r in range(size)])
    return out


def all_sum(tensors: list[torch.Tensor]) -> None:
    """Each of `tensors` (any device, the same shapes on every rank) replaced in place by its sum over the ranks;
    nothing outside a process group. Under NCCL a CPU tensor makes the trip through the rank's CUDA device."""
    if world()[1] == 1:
        return
    nccl = dist.get_backend() == "nccl"
    for t in tensors:
        if nccl and t.device.type != "cuda":
            on = t.cuda()
            dist.all_reduce(on)
            t.copy_(on.cpu())
        else:
            dist.all_reduce(t)
