"""DynamicViT on LV-ViT (TokenLabeling, Jiang et al. 2021): LV-ViT-S and LV-ViT-M with score predictors.

timm has no LV-ViT, so the backbone is assembled from timm's ``VisionTransformer`` and ``Block`` with the two
LV-ViT changes: a 4-layer convolutional patch embedding (7x7/2 conv, two 3x3 convs, each with BatchNorm and
ReLU, then an 8x8/8 projection) and re-scaled residuals (``x + f(x) / skip_lam``, skip_lam = 2). Attribute
names follow the official code, so official DynamicViT-LVViT checkpoints (``{'model': state_dict}``) load
strictly. The class output is LV-ViT's: ``head(cls) + 0.5 * max over patches of aux_head(patch)``.

Pruning is DeiT's (``models.dynamicvit``): before blocks 4, 8, 12 (S) or 5, 10, 15 (M) keep the top
int(196 * rho**s) patches; dropped tokens leave the sequence.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import torch
from timm.layers import to_2tuple
from timm.models.vision_transformer import Block
from torch import nn

from models.dynamic_zoo import DynamicStageTrace
from models.dynamicvit import DynamicViT, dynamicvit_forward, load_official_checkpoint
from models.registry import DYNAMIC_LVVIT

FAMILY = DYNAMIC_LVVIT


class LVViTArch(NamedTuple):
    embed_dim: int
    depth: int
    num_heads: int
    pruning_locations: tuple[int, ...]
    crop_pct: float


LVVIT_ARCHS: dict[str, LVViTArch] = {
    "lvvit_s": LVViTArch(384, 16, 6, (4, 8, 12), 0.9),
    "lvvit_m": LVViTArch(512, 20, 8, (5, 10, 15), 1.0),
}


class ConvPatchEmbed(nn.Module):
    """LV-ViT's patch embedding: conv 7x7/2, conv 3x3, conv 3x3 (each + BatchNorm + ReLU), conv (p/2)x(p/2)/(p/2).

    Takes timm's ``embed_layer`` arguments; returns (B, N, C) like timm's ``PatchEmbed``.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=384, stem_chans: int = 64,
                 **_timm_kwargs) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.conv1 = nn.Conv2d(in_chans, stem_chans, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chans)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(stem_chans, stem_chans, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem_chans)
        self.conv3 = nn.Conv2d(stem_chans, stem_chans, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(stem_chans)
        proj = self.patch_size[0] // 2
        self.proj = nn.Conv2d(stem_chans, embed_dim, kernel_size=proj, stride=proj)

    def feat_ratio(self, as_scalar: bool = True):
        return self.patch_size[0] if as_scalar else self.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"LV-ViT takes {self.img_size[0]}x{self.img_size[1]} images, got "
                             f"{x.shape[-2]}x{x.shape[-1]}.")
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.proj(x).flatten(2).transpose(1, 2)


class ResidualScale(nn.Module):
    """Divides a residual branch by a fixed ``skip_lam`` (LV-ViT's re-scaled residuals); no parameters."""

    def __init__(self, skip_lam: float) -> None:
        super().__init__()
        self.skip_lam = float(skip_lam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.skip_lam


class LVViTBlock(Block):
    """timm's pre-norm ``Block`` whose two residual branches are divided by ``skip_lam``.

    The scale sits where timm puts layer scale (``ls1``/``ls2``), so timm's forward, and every explicit forward
    that walks a block's submodules, computes x + f(x) / skip_lam without a forward of its own.
    """

    def __init__(self, *args, skip_lam: float = 2.0, **kwargs) -> None:
        kwargs["init_values"] = None
        super().__init__(*args, **kwargs)
        self.ls1 = ResidualScale(skip_lam)
        self.ls2 = ResidualScale(skip_lam)


class DynamicLVViT(DynamicViT):
    """LV-ViT with DynamicViT score predictors; ``model(x)`` is the unpruned LV-ViT."""

    def __init__(self, *, embed_dim: int = 384, depth: int = 16, num_heads: int = 6, mlp_ratio: float = 3.0,
                 skip_lam: float = 2.0, pruning_locations: Sequence[int] = (4, 8, 12), num_classes: int = 1000,
                 img_size: int = 224, patch_size: int = 16, stem_chans: int = 64, **vit_kwargs) -> None:
        super().__init__(
            pruning_locations=pruning_locations, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=False, num_classes=num_classes,
            norm_layer=nn.LayerNorm, embed_layer=partial(ConvPatchEmbed, stem_chans=stem_chans),
            block_fn=partial(LVViTBlock, skip_lam=skip_lam), **vit_kwargs)
        self.aux_head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.aux_head, nn.Linear):
            nn.init.trunc_normal_(self.aux_head.weight, std=0.02)
            nn.init.zeros_(self.aux_head.bias)
        self.skip_lam = skip_lam

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """LV-ViT's class output: head(CLS) + 0.5 * max over the (remaining) patch tokens of aux_head."""
        if pre_logits:
            return super().forward_head(x, pre_logits=True)
        return self.head(x[:, 0]) + 0.5 * self.aux_head(x[:, self.num_prefix_tokens:]).amax(dim=1)


def build_dynamic_lvvit(arch: str = "lvvit_s", **kwargs) -> DynamicLVViT:
    """A randomly initialised DynamicViT-LVViT with the shape of an official release (``lvvit_s`` / ``lvvit_m``)."""
    if arch not in LVVIT_ARCHS:
        raise KeyError(f"Unknown LV-ViT arch {arch!r}; known: {', '.join(LVVIT_ARCHS)}.")
    spec = LVVIT_ARCHS[arch]
    options = dict(embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads,
                   pruning_locations=spec.pruning_locations)
    options.update(kwargs)
    model = DynamicLVViT(**options)
    model.pretrained_cfg = dict(architecture=arch, input_size=(3, 224, 224), interpolation="bicubic",
                                crop_pct=spec.crop_pct, crop_mode="center", mean=(0.485, 0.456, 0.406),
                                std=(0.229, 0.224, 0.225), num_classes=model.num_classes,
                                first_conv="patch_embed.conv1", classifier="head")
    return model


def load_official_lvvit(model: DynamicLVViT, path_or_state_dict: str | Path | Mapping) -> DynamicLVViT:
    """Load an official DynamicViT-LVViT checkpoint strictly (keys are the official ones; see ``load_official_checkpoint``)."""
    return load_official_checkpoint(model, path_or_state_dict)


def lvvit_forward(model: DynamicLVViT, x: torch.Tensor, keep_ratio: float = 0.7, return_trace: bool = False):
    """Pruned inference (DeiT's token dropping). keep_ratio=1 reproduces ``model(x)``.

    Returns logits, or (logits, DynamicStageTrace) with ``return_trace``.
    """
    if not return_trace:
        return dynamicvit_forward(model, x, keep_ratio=keep_ratio)
    logits, vit_trace = dynamicvit_forward(model, x, keep_ratio=keep_ratio, return_trace=True)
    trace = DynamicStageTrace.from_dynamicvit_trace(vit_trace, tuple(x.shape[-2:]), family=FAMILY)
    return logits, trace


forward = lvvit_forward
