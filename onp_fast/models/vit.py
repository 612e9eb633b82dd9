"""Vision Transformers with timm's parameter names (`patch_embed.proj`, `cls_token`, `pos_embed`,
`blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`, `head`).

vit_small: dim 384, depth 12, 6 heads; vit_b_16: dim 768, depth 12, 12 heads. Head size stays 64;
`width` scales the number of heads (and so the dim): vit_small at width 0.5 has 3 heads, dim 192.
The patch size is fit to the input: 4 up to 32 pixels, 8 up to 64, 16 above (224 -> 16, as vit_b_16's
name says); it must divide input_size. The MLP hidden units (`mlp.fc1` outputs) are the prunable neurons.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def fit_patch_size(input_size: int) -> int:
    """Largest patch size <= the default for this input size (4 / 8 / 16) that divides input_size."""
    target = 4 if input_size <= 32 else 8 if input_size <= 64 else 16
    return next(p for p in range(min(target, input_size), 0, -1) if input_size % p == 0)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, dim] -> [B, N, dim]."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, dim] -> [B, N, dim] through `hidden` GELU units."""
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, dim] -> [B, N, dim]."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> tokens [B, (H/p)*(W/p), dim]."""
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32, patch_size: int = 4,
                 embed_dim: int = 384, depth: int = 12, num_heads: int = 6, mlp_hidden: int | None = None):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"patch size {patch_size} does not divide input size {input_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        self.input_size, self.patch_size = input_size, patch_size
        num_patches = (input_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(in_channels, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, embed_dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_hidden or 4 * embed_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, input_size, input_size] float32, normalised -> logits [B, num_classes]."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def _vit(base_heads, num_classes, in_channels, width, input_size, patch_size, embed_dim, depth, num_heads,
         mlp_hidden, default_patch=None) -> VisionTransformer:
    heads = num_heads or max(1, int(round(base_heads * width)))
    patch = patch_size or default_patch or fit_patch_size(input_size)
    return VisionTransformer(num_classes, in_channels, input_size, patch, embed_dim or 64 * heads, depth,
                             heads, mlp_hidden)


def vit_small(num_classes=10, in_channels=3, width=1.0, input_size=32, patch_size=None, embed_dim=None,
              depth=12, num_heads=None, mlp_hidden=None) -> VisionTransformer:
    return _vit(6, num_classes, in_channels, width, input_size, patch_size, embed_dim, depth, num_heads, mlp_hidden)


def vit_b_16(num_classes=10, in_channels=3, width=1.0, input_size=224, patch_size=None, embed_dim=None,
             depth=12, num_heads=None, mlp_hidden=None) -> VisionTransformer:
    default = 16 if input_size % 16 == 0 and input_size >= 224 else None
    return _vit(12, num_classes, in_channels, width, input_size, patch_size, embed_dim, depth, num_heads,
                mlp_hidden, default)
