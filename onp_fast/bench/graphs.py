"""Bench cases of the neuron_graphs op: the C++ op vs its pure-PyTorch reference on PreActResNet-18's weights."""
from __future__ import annotations

import torch
from torch import nn

from . import Case


def layer_weights(model: nn.Module) -> list[torch.Tensor]:
    """Every conv and linear weight of `model`, in module order (detached)."""
    return [m.weight.detach() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def preactresnet18_weights(seed: int = 0) -> list[torch.Tensor]:
    """The 21 conv/shortcut/linear weights of a seeded, randomly initialised PreActResNet-18 (10 classes)."""
    from ..models import build
    from ..seed import seed_everything

    seed_everything(seed)
    return layer_weights(build("preactresnet18", num_classes=10))


def cases(quick: bool) -> list[Case]:
    from ..ops import neuron_graphs
    from ..ops.reference import neuron_graphs_reference

    weights = preactresnet18_weights()
    repeats = 3 if quick else 15
    settings = [(0.5, 3)] if quick else [(0.0, 0), (0.5, 0), (0.5, 3), (0.9, 3)]
    out = []
    for eps, k in settings:
        name = f"neuron_graphs/preactresnet18/eps={eps}/topk={k}"
        info = {"edges": neuron_graphs(weights, eps, 0.05, k).num_edges, "threads": torch.get_num_threads()}
        out.append(Case(name, "reference", lambda e=eps, k=k: neuron_graphs_reference(weights, e, 0.05, k),
                        repeats=repeats, info=info))
        out.append(Case(name, "op_cpu", lambda e=eps, k=k: neuron_graphs(weights, e, 0.05, k), baseline="reference",
                        repeats=repeats, info=info))
        if torch.cuda.is_available():
            cuda_w = [w.cuda() for w in weights]

            def on_cuda(fn, w=cuda_w, e=eps, k=k):
                result = fn(w, e, 0.05, k)
                torch.cuda.synchronize()
                return result

            out.append(Case(name, "reference_cuda", lambda f=on_cuda: f(neuron_graphs_reference), repeats=repeats,
                            info=info))
            out.append(Case(name, "op_cuda", lambda f=on_cuda: f(neuron_graphs), baseline="reference_cuda",
                            repeats=repeats, info=info))
    return out
