"""DynamicCNN (Rao et al., T-PAMI 2023): structured spatial sparsification of timm's ConvNeXt.

The model is timm's ``ConvNeXt`` plus, as in the official ``AdaConvNeXt``, three score predictors for the
third stage (stride 16; 14x14 at 224 px) and a fast path (LayerNorm + Linear, with its own layer scale) on
every third-stage block from the first pruning location on. ``model(x)`` is the plain timm ConvNeXt.

Pruned inference (:func:`convnext_forward`) keeps the map whole: before the blocks at the pruning locations
a predictor scores every position of the current map and keeps the top int(N * r_s) with the official
schedule r = rho, rho - 0.2, rho - 0.4 (T: before stage-3 blocks 1, 2, 3; S/B: 3, 6, 9). In each block from
there on, the depthwise 7x7 conv runs on the full map, the pointwise MLP only on the kept positions and
the fast path on the others; the residual sum is the full map again.

Official checkpoints use the original ConvNeXt key names (``downsample_layers``, ``stages.i.j.dwconv``,
``pwconv1``, ``norm``/``head`` at the top); :data:`OFFICIAL_RENAMES` maps them one to one onto timm's names.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models.convnext import ConvNeXt
from torch import nn

from models.checkpoints import CheckpointError, load_strict, state_dict_and_source
from models.dynamic_zoo import (HierarchicalLayout, HierarchicalTrainOutput, adopt_backbone, checked_locations,
                                hierarchical_forward, hierarchical_train_stages, imagenet_cfg, linear_targets,
                                official_locations, scatter_positions, stage_size_hint)
from models.registry import DYNAMIC_CNN
from models.vit_forward import gather_tokens

FAMILY = DYNAMIC_CNN
PRUNED_STAGE = 2  # the official code prunes the third stage only


class ConvNeXtArch(NamedTuple):
    timm_name: str
    depths: tuple[int, ...]
    dims: tuple[int, ...]
    pruning_locations: tuple[int, ...]  # block indices inside the pruned stage


CONVNEXT_ARCHS: dict[str, ConvNeXtArch] = {
    "convnext_tiny": ConvNeXtArch("convnext_tiny", (3, 3, 9, 3), (96, 192, 384, 768), (1, 2, 3)),
    "convnext_small": ConvNeXtArch("convnext_small", (3, 3, 27, 3), (96, 192, 384, 768), (3, 6, 9)),
    "convnext_base": ConvNeXtArch("convnext_base", (3, 3, 27, 3), (128, 256, 512, 1024), (3, 6, 9)),
}


class MapScorePredictor(nn.Module):
    """The official ConvNeXt predictor on a (B, C, H, W) map: channels-first LayerNorm and 1x1 convs.

    First C/2 channels local, last C/2 averaged over the map.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(LayerNorm2d(dim, eps=1e-6), nn.Conv2d(dim, dim, 1), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Conv2d(dim, dim // 2, 1), nn.GELU(),
            nn.Conv2d(dim // 2, dim // 4, 1), nn.GELU(),
            nn.Conv2d(dim // 4, 2, 1), nn.LogSoftmax(dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) map -> (B, H*W, 2) log-probabilities, index 0 = keep.

        Computed on channels-last tokens with the 1x1 convs' weights as linear maps (the same arithmetic,
        much faster on CPU than 1x1 convolutions)."""
        norm, conv_in, act = self.in_conv
        tokens = x.flatten(2).transpose(1, 2)
        tokens = F.layer_norm(tokens, norm.weight.shape, norm.weight, norm.bias, norm.eps)
        feats = act(_pointwise(conv_in, tokens))
        half = feats.shape[-1] // 2
        local, pooled = feats[..., :half], feats[..., half:].mean(dim=1, keepdim=True)
        h = torch.cat([local, pooled.expand_as(local)], dim=-1)
        for layer in self.out_conv:
            h = _pointwise(layer, h) if isinstance(layer, nn.Conv2d) else layer(h)
        return h


def _pointwise(conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
    return F.linear(tokens, conv.weight.flatten(1), conv.bias)


def _init_new(module: nn.Module) -> None:
    """Official init of the added modules: truncated normal (std 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)


class DynamicConvNeXt(ConvNeXt):
    """timm ConvNeXt with DynamicCNN predictors (``score_predictor``) and per-block fast paths.

    ``fast_path`` / ``fast_path_gamma`` are attached to the third-stage blocks at construction (timm's block
    forward ignores them), so their keys sit where the official checkpoint has them.
    """

    def __init__(self, *, pruning_locations: Sequence[int] = (1, 2, 3), ls_init_value: float = 1e-6,
                 **convnext_kwargs) -> None:
        super().__init__(ls_init_value=ls_init_value, **convnext_kwargs)
        blocks = self.stages[PRUNED_STAGE].blocks
        locations = checked_locations(pruning_locations, len(blocks))
        self.pruning_locations = locations
        dim = self.stages[PRUNED_STAGE].blocks[0].conv_dw.in_channels
        for block in list(blocks)[locations[0]:]:
            block.fast_path = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, dim))
            block.fast_path_gamma = nn.Parameter(ls_init_value * torch.ones(dim))
            block.fast_path.apply(_init_new)
        self.score_predictor = nn.ModuleList(MapScorePredictor(dim) for _ in locations)
        self.score_predictor.apply(_init_new)


def build_dynamic_convnext(arch: str = "convnext_tiny", **kwargs) -> DynamicConvNeXt:
    """A randomly initialised DynamicCNN with the shape of an official release (convnext_tiny/small/base)."""
    if arch not in CONVNEXT_ARCHS:
        raise KeyError(f"Unknown ConvNeXt arch {arch!r}; known: {', '.join(CONVNEXT_ARCHS)}.")
    spec = CONVNEXT_ARCHS[arch]
    options = dict(depths=spec.depths, dims=spec.dims, pruning_locations=spec.pruning_locations)
    options.update(kwargs)
    model = DynamicConvNeXt(**options)
    model.pretrained_cfg = imagenet_cfg(arch, 0.875, "stem.0", "head.fc", model.num_classes)
    return model


def dynamic_convnext_from_backbone(convnext: ConvNeXt, pruning_locations: Sequence[int] = (1, 2, 3)) -> DynamicConvNeXt:
    """A DynamicConvNeXt holding a copy of a timm ConvNeXt's weights and fresh predictors/fast paths."""
    stages = convnext.stages
    if len(stages) != 4 or getattr(stages[PRUNED_STAGE].blocks[0], "use_conv_mlp", False):
        raise ValueError("DynamicCNN needs a four-stage timm ConvNeXt with a linear (channels-last) MLP.")
    depths = tuple(len(s.blocks) for s in stages)
    dims = tuple(s.blocks[0].conv_dw.in_channels for s in stages)
    model = DynamicConvNeXt(depths=depths, dims=dims, num_classes=convnext.num_classes,
                            pruning_locations=pruning_locations)
    return adopt_backbone(model, convnext, ("fast_path", "score_predictor."), "DynamicCNN")


# ---------------------------------------------------------------------------------------------
# Official checkpoints
# ---------------------------------------------------------------------------------------------
# (official pattern, timm replacement), applied in order to each official key. ``_TO_OFFICIAL`` is the inverse,
# written out (regular expressions do not invert themselves); the tests check the round trip key for key.
OFFICIAL_RENAMES: list[tuple[str, str]] = [
    (r"^downsample_layers\.0\.", "stem."),
    (r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample."),
    (r"^stages\.(\d+)\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv1\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv2\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^norm\.", "head.norm."),
    (r"^head\.", "head.fc."),
]
_TO_OFFICIAL: list[tuple[str, str]] = [
    (r"^stem\.", "downsample_layers.0."),
    (r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", r"stages.\1.\2.dwconv."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"stages.\1.\2.pwconv1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"stages.\1.\2.pwconv2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."),
    (r"^head\.norm\.", "norm."),
    (r"^head\.fc\.", "head."),
]


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    return key


def from_official_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_rename(k, OFFICIAL_RENAMES): v for k, v in state_dict.items()}


def official_state_dict(model: DynamicConvNeXt) -> dict[str, torch.Tensor]:
    """The model's weights under the official AdaConvNeXt key names (what the official code saves)."""
    return {_rename(k, _TO_OFFICIAL): v for k, v in model.state_dict().items()}


def _looks_official(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("downsample_layers.") for k in state_dict)


def _size_hint(model: DynamicConvNeXt, state_dict: Mapping[str, torch.Tensor]) -> str:
    ours = (model.stem[0].out_channels, len(model.stages[PRUNED_STAGE].blocks))
    known = {name: (arch.dims[0], arch.depths[PRUNED_STAGE]) for name, arch in CONVNEXT_ARCHS.items()}
    return stage_size_hint(state_dict, "stem.0.weight", f"stages.{PRUNED_STAGE}.blocks", ours, known, "ConvNeXt")


def load_official_convnext(model: DynamicConvNeXt, path_or_state_dict: str | Path | Mapping) -> DynamicConvNeXt:
    """Load an official DynamicCNN checkpoint (file, ``{'model': sd}`` or a state dict) strictly into ``model``.

    Official key names are mapped one to one onto timm's; a file already in timm's names loads as is.
    Raises CheckpointError naming the file and listing missing, unexpected and misshapen keys.
    """
    state_dict, source = state_dict_and_source(path_or_state_dict)
    if _looks_official(state_dict):
        state_dict = from_official_keys(state_dict)
    try:
        load_strict(model, state_dict, source=source)
    except CheckpointError as exc:
        raise CheckpointError(str(exc) + _size_hint(model, state_dict)) from exc
    return model


# ---------------------------------------------------------------------------------------------
# Pruned inference
# ---------------------------------------------------------------------------------------------
def _ffn(block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The block's per-position part on (B, k, C) tokens: norm, MLP, layer scale."""
    out = block.mlp(block.norm(tokens))
    return out * block.gamma if block.gamma is not None else out


def _fast(block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return block.fast_path(tokens) * block.fast_path_gamma


def structured_block(block: nn.Module, x: torch.Tensor, kept: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """One third-stage block: depthwise conv on the full (B, C, H, W) map, MLP on ``kept``, fast path on ``rest``."""
    batch, channels, height, width = x.shape
    mixed = block.conv_dw(x).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
    parts = [(kept, _ffn(block, gather_tokens(mixed, kept)))]
    if rest.shape[1]:
        parts.append((rest, _fast(block, gather_tokens(mixed, rest))))
    update = scatter_positions(mixed, parts).view(batch, height, width, channels).permute(0, 3, 1, 2)
    return block.shortcut(x) + block.drop_path(update)


LAYOUT = HierarchicalLayout(
    family=FAMILY, stages="stages", pruned_stage=PRUNED_STAGE,
    embed=lambda model, x: model.stem(x),
    grid=lambda x: (x.shape[-2], x.shape[-1]),  # (B, C, H, W)
    predictor_input=lambda x: x,
    structured_block=structured_block,
    head=lambda model, x: model.forward_head(model.norm_pre(x)))


def convnext_forward(model: DynamicConvNeXt, x: torch.Tensor, keep_ratio: float = 0.7, return_trace: bool = False):
    """Structured pruned inference (see the module docstring). keep_ratio=1 reproduces ``model(x)``.

    Returns logits, or (logits, DynamicStageTrace) with ``return_trace``.
    """
    return hierarchical_forward(LAYOUT, model, x, keep_ratio, return_trace)


forward = convnext_forward


# ---------------------------------------------------------------------------------------------
# Training forward: the official two-stream form with Gumbel-softmax masks
# ---------------------------------------------------------------------------------------------
def _two_stream_block(block: nn.Module, streams: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor):
    """The official AdaBlock in training: stream 1 carries the MLP path, stream 2 the fast path.

    The depthwise conv sees the mixed map; each stream takes the conv output at its own positions (mask 1 for
    stream 1, 0 for stream 2) and keeps its own values elsewhere, then adds its branch to itself.
    """
    first, second = streams
    mixed = block.conv_dw(first * mask + second * (1 - mask))
    first_in = (mixed * mask + first * (1 - mask)).permute(0, 2, 3, 1)
    second_in = (mixed * (1 - mask) + second * mask).permute(0, 2, 3, 1)
    first = first + block.drop_path(_ffn(block, first_in).permute(0, 3, 1, 2))
    second = second + block.drop_path(_fast(block, second_in).permute(0, 3, 1, 2))
    return first, second


def convnext_features_for_distillation(convnext: ConvNeXt, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain ConvNeXt's logits and final-norm features per last-stage position (B, N, C): the teacher's targets."""
    feats = convnext.forward_features(x)
    return convnext.forward_head(feats), convnext.head.norm(feats).flatten(2).transpose(1, 2)


def convnext_train_forward(model: DynamicConvNeXt, x: torch.Tensor, tau: float = 1.0, keep_ratio: float = 0.7,
                           hard: bool = True, policy_override: Sequence[torch.Tensor] | None = None):
    """The official DynamicCNN training forward (``AdaConvNeXt`` in training mode).

    Each predictor samples a (straight-through) Gumbel-softmax keep mask over the whole third-stage map; from
    the first predictor on, the blocks carry two streams (see ``_two_stream_block``) that are mixed by the
    current mask where a map is needed. ``keep_ratio`` only sets the targets returned for the loss;
    ``policy_override`` (one (B, H*W) 0/1 tensor per stage) replaces the samples, e.g. to test the masking.
    """
    x, decisions = hierarchical_train_stages(
        LAYOUT, model, x, _two_stream_block, mask_shape=lambda current: (current.shape[0], 1, *current.shape[2:]),
        tau=tau, hard=hard, policy_override=policy_override)
    x = model.norm_pre(x)
    featmap = model.head.norm(x).flatten(2).transpose(1, 2)
    return HierarchicalTrainOutput(model.forward_head(x), featmap, decisions,
                                   linear_targets(keep_ratio, len(model.pruning_locations)))


def official_pruning_locations(stage_depth: int) -> tuple[int, ...]:
    """The official predictor positions for a third stage of ``stage_depth`` blocks (T: 9, S/B: 27)."""
    return official_locations(CONVNEXT_ARCHS, PRUNED_STAGE, stage_depth, "DynamicCNN", "ConvNeXt")
