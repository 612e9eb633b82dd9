"""Reading an architecture's build kwargs (width, in_channels, num_classes, ...) from a state_dict's shapes."""
from __future__ import annotations

import math

import torch

from ..errors import UserError
from . import build, canonical_name


def _get(sd: dict, key: str, arch: str) -> torch.Tensor:
    if key not in sd:
        first = ", ".join(list(sd)[:3])
        raise UserError(f"the weights do not fit {arch}: no key {key!r} (first keys in the file: {first})")
    return sd[key]


def _shapes_fit(arch: str, kwargs: dict, sd: dict) -> bool:
    """Whether `arch` built with `kwargs` has exactly the parameter shapes in `sd`."""
    try:
        model = build(arch, **kwargs)
    except UserError:
        return False
    own = model.state_dict()
    return all(k in sd and tuple(sd[k].shape) == tuple(v.shape) for k, v in own.items()
               if not k.endswith("num_batches_tracked"))


def infer_arch_kwargs(arch: str, sd: dict[str, torch.Tensor]) -> dict:
    """Build kwargs for `arch` that fit the state_dict `sd` (keys without a `module.` prefix).

    Reads in_channels and width from the stem, num_classes from the last layer, and family options
    (ResNet stem, VGG pool/hidden, ViT patch/dim/depth/heads/input size). Unknowable settings keep defaults
    (input_size 32 for CNNs, 224 for an ImageNet-stem ResNet).
    """
    arch = canonical_name(arch)
    if arch.startswith("preactresnet"):
        stem, head = _get(sd, "conv1.weight", arch), _get(sd, "linear.weight", arch)
        return dict(num_classes=head.shape[0], in_channels=stem.shape[1], width=stem.shape[0] / 64)
    if arch.startswith("resnet"):
        stem, head = _get(sd, "conv1.weight", arch), _get(sd, "fc.weight", arch)
        imagenet = stem.shape[-1] == 7
        return dict(num_classes=head.shape[0], in_channels=stem.shape[1], width=stem.shape[0] / 64,
                    stem="imagenet" if imagenet else "cifar", input_size=224 if imagenet else 32)
    if arch.startswith("vgg"):
        stem = _get(sd, "features.0.weight", arch)
        first, last = _get(sd, "classifier.0.weight", arch), _get(sd, "classifier.6.weight", arch)
        width = stem.shape[0] / 64
        convs = [v for k, v in sd.items() if k.startswith("features.") and k.endswith(".weight") and v.dim() == 4]
        pool = int(round(math.sqrt(first.shape[1] / convs[-1].shape[0])))
        return dict(num_classes=last.shape[0], in_channels=stem.shape[1], width=width, pool=pool,
                    hidden=first.shape[0], input_size=224 if pool > 1 else 32)
    if arch == "mobilenet_v2":
        stem, head = _get(sd, "features.0.0.weight", arch), _get(sd, "classifier.1.weight", arch)
        base = dict(num_classes=head.shape[0], in_channels=stem.shape[1])
        for width in [stem.shape[0] / 32, 0.25, 0.35, 0.5, 0.75, 1.0, 1.3, 1.4, 1.5, 2.0]:
            if _shapes_fit(arch, dict(base, width=width), sd):
                return dict(base, width=width)
        return dict(base, width=stem.shape[0] / 32)  # load_state_dict names the mismatch
    if arch.startswith("vit"):
        proj, pos, head = (_get(sd, "patch_embed.proj.weight", arch), _get(sd, "pos_embed", arch),
                           _get(sd, "head.weight", arch))
        dim, patch = proj.shape[0], proj.shape[-1]
        grid = int(round(math.sqrt(pos.shape[1] - 1)))
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        fc1 = _get(sd, "blocks.0.mlp.fc1.weight", arch) if depth else None
        return dict(num_classes=head.shape[0], in_channels=proj.shape[1], input_size=grid * patch, patch_size=patch,
                    embed_dim=dim, depth=depth, num_heads=max(1, dim // 64),
                    mlp_hidden=fc1.shape[0] if fc1 is not None else None)
    raise UserError(f"cannot infer the options of {arch} from its weights: pass them explicitly")


def torchvision_vit_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames a torchvision VisionTransformer state_dict (conv_proj, encoder.layers..., heads.head) to
    the timm names our ViTs use; other state_dicts are returned unchanged."""
    if "conv_proj.weight" not in sd:
        return sd
    out = {}
    for k, v in sd.items():
        n = k
        n = n.replace("conv_proj.", "patch_embed.proj.").replace("heads.head.", "head.")
        if n == "class_token":
            n = "cls_token"
        elif n == "encoder.pos_embedding":
            n = "pos_embed"
        elif n.startswith("encoder.ln."):
            n = "norm." + n[len("encoder.ln."):]
        elif n.startswith("encoder.layers.encoder_layer_"):
            rest = n[len("encoder.layers.encoder_layer_"):]
            idx, _, sub = rest.partition(".")
            sub = (sub.replace("ln_1.", "norm1.").replace("ln_2.", "norm2.")
                   .replace("self_attention.in_proj_weight", "attn.qkv.weight")
                   .replace("self_attention.in_proj_bias", "attn.qkv.bias")
                   .replace("self_attention.out_proj.", "attn.proj.")
                   .replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
                   .replace("mlp.linear_1.", "mlp.fc1.").replace("mlp.linear_2.", "mlp.fc2."))
            n = f"blocks.{idx}.{sub}"
        out[n] = v
    return out
