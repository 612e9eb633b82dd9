"""Model zoo: every architecture builds and runs; PreActResNet matches BackdoorBench exactly."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from onp_fast import models
from onp_fast.errors import UserError
from onp_fast.models.infer import infer_arch_kwargs, torchvision_vit_to_timm
from onp_fast.models.vit import fit_patch_size

SMALL = {"vit_small": dict(depth=2), "vit_b_16": dict(depth=2)}


pytestmark = pytest.mark.usefixtures("one_thread")


# BackdoorBench's models/preact_resnet.py (reference copy for the equality test)
class _BBPreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class _BBPreActResNet(nn.Module):
    def __init__(self, num_blocks, num_classes=10):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(_BBPreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.avgpool(out)
        return self.linear(out.view(out.size(0), -1))


@pytest.mark.parametrize("name", models.names())
@pytest.mark.parametrize("in_channels,size", [(3, 32), (1, 16)])
def test_every_model_builds_and_runs(name, in_channels, size):
    m = models.build(name, num_classes=7, in_channels=in_channels, width=0.125, input_size=size, **SMALL.get(name, {}))
    out = m.eval()(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    assert m.onp_arch == name and m.onp_arch_kwargs["width"] == 0.125
    assert models.prunable_neuron_count(m) > 0


def test_preactresnet18_is_backdoorbench():
    ours, ref = models.build("preactresnet18"), _BBPreActResNet([2, 2, 2, 2])
    bns = [m for m in ours.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 16 and sum(b.num_features for b in bns) == 3392
    assert models.prunable_neuron_count(ours) == 3392
    ref_sd = ref.state_dict()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref_sd.items()}
    assert "layer2.0.shortcut.0.weight" in ref_sd and "bn1.weight" not in ref_sd
    with torch.no_grad():  # non-trivial BN statistics
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.uniform_(0.5, 1.5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(ours.eval()(x), ref.eval()(x))
    assert len(models.build("preactresnet34").layer3) == 6


def test_width_scales_channels():
    m = models.build("preactresnet18", width=0.25)
    assert m.conv1.out_channels == 16 and m.linear.in_features == 128


def test_resnet_stems():
    cifar = models.build("resnet18", input_size=32, width=0.125)
    assert cifar.conv1.kernel_size == (3, 3) and isinstance(cifar.maxpool, nn.Identity)
    imnet = models.build("resnet18", input_size=224, width=0.125)
    assert imnet.conv1.kernel_size == (7, 7) and isinstance(imnet.maxpool, nn.MaxPool2d)
    forced = models.build("resnet18", input_size=32, width=0.125, stem="imagenet")
    assert forced.conv1.kernel_size == (7, 7)
    r50 = models.build("resnet50", width=0.125)
    assert r50.fc.in_features == 8 * 8 * 4 and "layer1.0.downsample.0.weight" in r50.state_dict()


def test_vit_patch_fits_input():
    assert [fit_patch_size(s) for s in (8, 16, 28, 32, 64, 224)] == [4, 4, 4, 4, 8, 16]
    vit = models.build("vit_b_16", input_size=224, width=0.0625, depth=1)
    assert vit.patch_size == 16 and vit.pos_embed.shape[1] == 14 * 14 + 1
    small = models.build("vit_small", depth=1)
    assert small.patch_embed.proj.out_channels == 384 and len(models.build("vit_small", width=0.2).blocks) == 12
    assert small.blocks[0].attn.num_heads == 6 and small.blocks[0].mlp.fc1.out_features == 1536


def test_unknown_and_bad_options():
    with pytest.raises(UserError, match="unknown architecture"):
        models.build("alexnet")
    with pytest.raises(UserError):
        models.build("resnet18", width=0)
    with pytest.raises(UserError):
        models.build("resnet18", stem="weird")
    assert models.canonical_name("VGG16_BN") == "vgg16_bn" and models.canonical_name("PreActResNet18") == "preactresnet18"


@pytest.mark.parametrize("name,kwargs", [
    ("preactresnet18", dict(num_classes=5, in_channels=1, width=0.25)),
    ("resnet34", dict(num_classes=3, width=0.125, input_size=224)),
    ("vgg19_bn", dict(num_classes=4, in_channels=1, width=0.125)),
    ("vgg16_bn", dict(num_classes=4, width=0.0625, input_size=224)),
    ("mobilenet_v2", dict(num_classes=6, width=0.35)),
    ("vit_small", dict(num_classes=3, width=0.5, input_size=16, depth=2)),
])
def test_infer_kwargs_from_weights(name, kwargs):
    sd = models.build(name, **kwargs).state_dict()
    again = models.build(name, **infer_arch_kwargs(name, sd))
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in sd.items()}


def test_torchvision_vit_names_map_to_ours():
    m = models.build("vit_small", width=0.5, depth=2)
    tv = {}
    for k, v in m.state_dict().items():  # our names -> torchvision's
        n = (k.replace("patch_embed.proj.", "conv_proj.").replace("head.", "heads.head.")
             .replace("cls_token", "class_token").replace("pos_embed", "encoder.pos_embedding"))
        if n.startswith("norm."):
            n = "encoder.ln." + n[5:]
        if n.startswith("blocks."):
            _, i, rest = n.split(".", 2)
            rest = (rest.replace("norm1.", "ln_1.").replace("norm2.", "ln_2.")
                    .replace("attn.qkv.weight", "self_attention.in_proj_weight")
                    .replace("attn.qkv.bias", "self_attention.in_proj_bias")
                    .replace("attn.proj.", "self_attention.out_proj.").replace("mlp.fc1.", "mlp.0.")
                    .replace("mlp.fc2.", "mlp.3."))
            n = f"encoder.layers.encoder_layer_{i}.{rest}"
        tv[n] = v
    assert torchvision_vit_to_timm(tv).keys() == m.state_dict().keys()
