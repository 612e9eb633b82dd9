"""Which norm layer normalises a conv/linear layer's output, read from the traced graph (not module names)."""
from __future__ import annotations

import torch.nn as nn

from .trace import trace

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def norm_after(model: nn.Module) -> dict[str, str]:
    """{conv or linear module name: name of the affine BatchNorm (with running statistics) that is the sole
    reader of its output}. A module called at several places is paired only when every call has the same BN.

    Module order or names are not enough: in a pre-activation ResNet `conv1`'s output is read by `bn2` (and
    `bn1` reads the block input), so pairing `conv1 -> bn1` would be wrong for most blocks."""
    gm = trace(model)
    modules = dict(model.named_modules())
    found: dict[str, set] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _WEIGHTED):
            continue
        users = list(node.users)
        bn = None
        if len(users) == 1 and users[0].op == "call_module":
            cand = modules.get(users[0].target)
            if isinstance(cand, nn.modules.batchnorm._BatchNorm) and cand.affine and cand.track_running_stats:
                bn = users[0].target
        found.setdefault(node.target, set()).add(bn)
    return {name: next(iter(bns)) for name, bns in found.items() if len(bns) == 1 and None not in bns}
