"""Memory budgets (`--max-memory`, RepairConfig.max_memory): parse sizes like "512MB", estimate what a model's
forward takes per image, pick how many images (or masks) run at once under a budget, split a training step into
micro-batches (refusing one whose smallest micro-batch does not fit), and read the process's peak memory. One
place for each, shared by every layer above.

The budgets these functions take cover activations (the tensors a forward creates), not the weights; a
repair's `--max-memory` covers the whole process, `reserved_bytes` of it kept aside for the runtime and the
weights' copies (RepairConfig.activation_memory)."""
from __future__ import annotations

import re
import resource
import sys
import weakref

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .errors import UserError

DEFAULT_MAX_MEMORY = "1GB"  # the activation budget wherever none is given (RepairConfig, RewardEngine, the CLI)
RUNTIME_RESERVE = 1280 * 1024**2  # of a whole-process budget: torch, the data, the bookkeeping (docs/design.md)
MODEL_COPIES = 7  # of a whole-process budget: the copies of the model's weights a repair holds at once (docs/design.md)
SHARED_COPIES = 2  # and what a comparison holds besides: the caller's model and the unlearned copy its runs share

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_memory(value: int | float | str) -> int:
    """Bytes (>= 1) from an int or a string like "512MB", "1.5GiB", "800k" (decimal k/M/G/T, binary
    KiB/MiB/GiB/TiB, plain bytes); UserError (one line) for anything else or a size under one byte."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not value >= 1:  # also NaN
            raise UserError(f"memory budget must be at least one byte, got {value}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise UserError(f"bad memory size {value!r}: use e.g. 512MB, 2GB, 1.5GiB or a number of bytes")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size < 1:
        raise UserError(f"memory budget must be at least one byte, got {value!r}")
    return size


def reserved_bytes(model: nn.Module, copies: int = MODEL_COPIES) -> int:
    """What a repair's whole-process memory budget keeps for other than activations: RUNTIME_RESERVE plus
    `copies` x the bytes of `model`'s parameters and buffers (at a repair's peak, purification's sharpness-aware
    step: the frozen model, the pruned one, the state purification keeps, the momentum, the gradient and the
    ascent step; one more for the optimiser's temporaries)."""
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return RUNTIME_RESERVE + copies * weights


def format_bytes(n: float) -> str:
    """1536 -> "1.5 KiB" (B, KiB, MiB, GiB)."""
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


class _OutputBytes(TorchDispatchMode):
    """Within: sums the bytes of every tensor an operation returns that shares no storage with its inputs (views
    and in-place results are not new memory). Sees inside TorchScript and fx models too (it sits at the
    dispatcher, below Python hooks)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.total += t.untyped_storage().nbytes()
        return out


_PER_IMAGE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def activation_bytes(model: nn.Module, sample: torch.Tensor) -> int:
    """Bytes of activations per image of `model`'s forward, for images shaped like sample [n, ...] (n >= 1, any
    device: moved to the model's): the sum of every tensor its operations create on the first (at most two)
    images, divided by their count. An upper bound of an inference forward's live peak (which frees as it
    goes), and about what one training step keeps (autograd holds most of them, and their gradients replace
    them as backward runs). Measured once per (model, image shape, dtype, device) in eval mode without
    gradients (BatchNorm statistics untouched, no random draws; the model's training flags are restored) and
    cached for as long as the model lives."""
    key = (tuple(sample.shape[1:]), sample.dtype, _device_of(model))
    cached = _PER_IMAGE.setdefault(model, {})
    if key not in cached:
        probe = sample[:2].to(key[2])
        flags = [(m, m.training) for m in model.modules()]
        counter = _OutputBytes()
        try:
            model.eval()
            with torch.no_grad(), counter:
                model(probe)
        finally:
            for m, flag in flags:
                m.training = flag
        cached[key] = max(1, -(-counter.total // len(probe)))
    return cached[key]


def fit_batch(model: nn.Module, sample: torch.Tensor, budget: int | str | None, cap: int) -> int:
    """How many images to run at once where the batch is only a throughput choice (inference, feature passes,
    reward scoring, gradients summed over chunks): at most `cap`, and within `budget` (bytes or a size string;
    None: no budget, `cap` as it is) by `activation_bytes(model, sample)`. UserError naming the budget needed
    when not even one image fits."""
    cap = max(1, int(cap))
    if budget is None or len(sample) == 0:
        return cap
    budget = parse_memory(budget)
    per = activation_bytes(model, sample)
    if per > budget:
        raise UserError(f"max_memory {format_bytes(budget)} is too small: one image's activations need about "
                        f"{format_bytes(per)} (raise --max-memory / max_memory)")
    return max(1, min(cap, budget // per))


def train_mode_min(model: nn.Module) -> int:
    """The fewest images a training-mode micro-batch of `model` may hold: 2 when it has a BatchNorm (which
    normalises over the micro-batch), else 1."""
    return 2 if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) else 1


def micro_batch(model: nn.Module, sample: torch.Tensor, batch: int, budget: int | str | None, what: str = "a step",
                min_size: int | None = None) -> int:
    """Images per micro-batch of a training step of `batch` images of `model` (shaped like sample [n, ...]) whose
    gradients are accumulated over micro-batches: `batch` when `budget` (bytes or a size string; None: no budget)
    holds them all by `activation_bytes` (the step then runs whole, as without a budget), else the most that fit
    (`fit_batch`), at least `min_size` (None: a training-mode step's, `train_mode_min`; 1 in eval mode).
    UserError (one line, naming `what` and the budget needed) when not even min(min_size, batch) images fit."""
    batch = max(1, int(batch))
    if budget is None or len(sample) == 0:
        return batch
    budget = parse_memory(budget)
    smallest = min(max(1, train_mode_min(model) if min_size is None else min_size), batch)
    need = activation_bytes(model, sample) * smallest
    if need > budget:
        whole = f" (of a step's {batch})" if smallest < batch else ""
        raise UserError(f"max_memory {format_bytes(budget)} is too small for {what}: even a micro-batch of "
                        f"{smallest} image{'s' if smallest > 1 else ''}{whole} needs about {format_bytes(need)} "
                        f"(raise --max-memory / max_memory to at least that)")
    return fit_batch(model, sample, budget, batch)


def peak_memory(device: str | torch.device = "cpu") -> dict:
    """The process's peak memory so far: {"rss_bytes": peak resident set size (getrusage ru_maxrss: KiB on
    Linux, bytes on macOS), "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated on a CUDA `device`,
    else None}."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dev = torch.device(device)
    cuda = int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None
    return {"rss_bytes": int(rss if sys.platform == "darwin" else rss * 1024), "cuda_max_allocated_bytes": cuda}
