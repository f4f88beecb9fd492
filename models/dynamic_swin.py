"""DynamicSwin (Rao et al., T-PAMI 2023): structured spatial sparsification of timm's Swin Transformer.

The model is timm's ``SwinTransformer`` plus, as in the official ``AdaSwinTransformer``, three score
predictors on the third stage (stride 16; 14x14 at 224 px, window 7) and a fast MLP (LayerNorm + Linear) on
every third-stage block from the first pruning location on. ``model(x)`` is the plain timm Swin.

Pruned inference (:func:`swin_forward`) keeps the map whole, because shifted windows and patch merging need
it: before the blocks at the pruning locations (T: third-stage blocks 1, 2, 3; S/B: 2, 4, 6) a predictor
scores every position and keeps the top int(N * r_s), r = rho, rho - 0.2, rho - 0.4 (official schedule).
In each block from there on, window attention runs on the full map, the MLP only on the kept positions and
the fast MLP on the others.

Official checkpoints use Microsoft's Swin names: the patch merging sits at the end of a stage (timm: at the
start of the next one), the classifier is ``head`` (timm: ``head.fc``), and the buffers
``relative_position_index`` and ``attn_mask`` are saved (timm recomputes them; the loader checks they match).
Predictors (``layers.2.score_predictor``) and fast MLPs (``...blocks.j.fastmlp``) keep their official names.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from models.checkpoints import CheckpointError, load_strict, state_dict_and_source
from models.dynamic_zoo import (HierarchicalLayout, HierarchicalTrainOutput, adopt_backbone, checked_locations,
                                hierarchical_forward, hierarchical_train_stages, imagenet_cfg, linear_targets,
                                official_locations, scatter_positions, stage_size_hint)
from models.dynamicvit import ScorePredictor, _init_predictor
from models.registry import DYNAMIC_SWIN
from models.vit_forward import gather_tokens, window_attention

FAMILY = DYNAMIC_SWIN
PRUNED_STAGE = 2
_BUFFERS = ("relative_position_index", "attn_mask")


class SwinArch(NamedTuple):
    timm_name: str
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    pruning_locations: tuple[int, ...]


SWIN_ARCHS: dict[str, SwinArch] = {
    "swin_tiny_patch4_window7_224": SwinArch("swin_tiny_patch4_window7_224", 96, (2, 2, 6, 2), (3, 6, 12, 24), (1, 2, 3)),
    "swin_small_patch4_window7_224": SwinArch("swin_small_patch4_window7_224", 96, (2, 2, 18, 2), (3, 6, 12, 24), (2, 4, 6)),
    "swin_base_patch4_window7_224": SwinArch("swin_base_patch4_window7_224", 128, (2, 2, 18, 2), (4, 8, 16, 32), (2, 4, 6)),
}


class FastMlp(nn.Module):
    """The official ``fastMlp``: LayerNorm + Linear under the name ``fc1`` (key ``fastmlp.fc1.{0,1}``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(x)


class DynamicSwin(SwinTransformer):
    """timm Swin with DynamicSwin predictors (on ``layers[2]``) and fast MLPs on its blocks, attached at construction."""

    def __init__(self, *, pruning_locations: Sequence[int] = (1, 2, 3), **swin_kwargs) -> None:
        super().__init__(**swin_kwargs)
        stage = self.layers[PRUNED_STAGE]
        locations = checked_locations(pruning_locations, len(stage.blocks))
        self.pruning_locations = locations
        dim = stage.blocks[0].norm1.normalized_shape[0]
        for block in list(stage.blocks)[locations[0]:]:
            block.fastmlp = FastMlp(dim)
            block.fastmlp.apply(_init_predictor)
        stage.score_predictor = nn.ModuleList(ScorePredictor(dim) for _ in locations)
        stage.score_predictor.apply(_init_predictor)

    @property
    def score_predictor(self) -> nn.ModuleList:
        return self.layers[PRUNED_STAGE].score_predictor


def build_dynamic_swin(arch: str = "swin_tiny_patch4_window7_224", **kwargs) -> DynamicSwin:
    """A randomly initialised DynamicSwin with the shape of an official release (swin tiny/small/base, window 7)."""
    if arch not in SWIN_ARCHS:
        raise KeyError(f"Unknown Swin arch {arch!r}; known: {', '.join(SWIN_ARCHS)}.")
    spec = SWIN_ARCHS[arch]
    options = dict(img_size=224, patch_size=4, window_size=7, embed_dim=spec.embed_dim, depths=spec.depths,
                   num_heads=spec.num_heads, pruning_locations=spec.pruning_locations)
    options.update(kwargs)
    model = DynamicSwin(**options)
    model.pretrained_cfg = imagenet_cfg(arch, 0.9, "patch_embed.proj", "head.fc", model.num_classes)
    return model


def dynamic_swin_from_backbone(swin: SwinTransformer, pruning_locations: Sequence[int] = (1, 2, 3)) -> DynamicSwin:
    """A DynamicSwin holding a copy of a timm Swin's weights and fresh predictors/fast MLPs."""
    blocks = [stage.blocks for stage in swin.layers]
    if len(blocks) != 4:
        raise ValueError("DynamicSwin needs a four-stage timm Swin Transformer.")
    first_block = blocks[0][0]
    model = DynamicSwin(
        img_size=swin.patch_embed.img_size, patch_size=swin.patch_embed.patch_size,
        window_size=max(first_block.attn.window_size), embed_dim=swin.embed_dim,
        depths=tuple(len(b) for b in blocks), num_heads=tuple(b[0].attn.num_heads for b in blocks),
        mlp_ratio=first_block.mlp_ratio, num_classes=swin.num_classes, pruning_locations=pruning_locations)
    return adopt_backbone(model, swin, ("fastmlp", "score_predictor"), "DynamicSwin")


# ---------------------------------------------------------------------------------------------
# Official checkpoints
# ---------------------------------------------------------------------------------------------
def _official_buffers(model: DynamicSwin) -> dict[str, torch.Tensor]:
    """The buffers the official code saves, under timm's key names: relative position index of every block
    and the shifted-window mask of every block with a shift (what the official file holds, computed here)."""
    buffers = {}
    for name, module in model.named_modules():
        index = getattr(module, "relative_position_index", None)
        if isinstance(index, torch.Tensor):
            buffers[f"{name}.relative_position_index"] = index
        mask = getattr(module, "attn_mask", None)
        if hasattr(module, "shift_size") and isinstance(mask, torch.Tensor):
            buffers[f"{name}.attn_mask"] = mask
    return buffers


def _from_official_key(key: str) -> str:
    key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
    return re.sub(r"^head\.", "head.fc.", key)


def _to_official_key(key: str) -> str:
    key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)
    return re.sub(r"^head\.fc\.", "head.", key)


def official_state_dict(model: DynamicSwin) -> dict[str, torch.Tensor]:
    """The model's weights (and the saved buffers) under the official AdaSwinTransformer key names."""
    state = dict(model.state_dict())
    state.update(_official_buffers(model))
    return {_to_official_key(k): v for k, v in state.items()}


def _looks_official(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return "layers.0.downsample.reduction.weight" in state_dict


def _check_buffers(model: DynamicSwin, state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Drop the saved buffers after checking them against the model's own (they encode the window layout)."""
    expected = _official_buffers(model)
    saved = {k: v for k, v in state_dict.items() if k.endswith(_BUFFERS)}
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    wrong = [k for k in sorted(set(saved) & set(expected))
             if saved[k].shape != expected[k].shape or not torch.equal(saved[k].to(expected[k]), expected[k])]
    if missing or unexpected or wrong:
        problems = [f"{name} {len(keys)}, e.g. {keys[0]}" for name, keys in
                    (("missing", missing), ("unexpected", unexpected), ("different", wrong)) if keys]
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: its window buffers differ "
                              f"({'; '.join(problems)}): a different window size, input size or depth?")
    return {k: v for k, v in state_dict.items() if k not in saved}


def _size_hint(model: DynamicSwin, state_dict: Mapping[str, torch.Tensor]) -> str:
    ours = (model.embed_dim, len(model.layers[PRUNED_STAGE].blocks))
    known = {name: (arch.embed_dim, arch.depths[PRUNED_STAGE]) for name, arch in SWIN_ARCHS.items()}
    return stage_size_hint(state_dict, "patch_embed.proj.weight", f"layers.{PRUNED_STAGE}.blocks", ours, known,
                           "Swin")


def load_official_swin(model: DynamicSwin, path_or_state_dict: str | Path | Mapping) -> DynamicSwin:
    """Load an official DynamicSwin checkpoint (file, ``{'model': sd}`` or state dict) strictly into ``model``.

    Raises CheckpointError naming the file and listing missing, unexpected and misshapen keys.
    """
    state_dict, source = state_dict_and_source(path_or_state_dict)
    if _looks_official(state_dict):
        state_dict = {_from_official_key(k): v for k, v in state_dict.items()}
        hint = _size_hint(model, state_dict)
        try:
            state_dict = _check_buffers(model, state_dict, source)
        except CheckpointError as exc:
            if hint:
                raise CheckpointError(str(exc) + hint) from exc
            raise
    try:
        load_strict(model, state_dict, source=source)
    except CheckpointError as exc:
        raise CheckpointError(str(exc) + _size_hint(model, state_dict)) from exc
    return model


# ---------------------------------------------------------------------------------------------
# Pruned inference
# ---------------------------------------------------------------------------------------------
def structured_block(block: nn.Module, x: torch.Tensor, kept: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """One third-stage block on a (B, H, W, C) map: window attention on all of it, MLP on ``kept``, fast MLP on ``rest``."""
    batch, height, width, channels = x.shape
    x = x + block.drop_path1(window_attention(block, block.norm1(x)))
    tokens = x.reshape(batch, height * width, channels)
    parts = [(kept, block.mlp(block.norm2(gather_tokens(tokens, kept))))]
    if rest.shape[1]:
        parts.append((rest, block.fastmlp(gather_tokens(tokens, rest))))
    tokens = tokens + block.drop_path2(scatter_positions(tokens, parts))
    return tokens.reshape(batch, height, width, channels)


LAYOUT = HierarchicalLayout(
    family=FAMILY, stages="layers", pruned_stage=PRUNED_STAGE,
    embed=lambda model, x: model.patch_embed(x),  # (B, H, W, C)
    grid=lambda x: (x.shape[1], x.shape[2]),
    predictor_input=lambda x: x.flatten(1, 2),
    structured_block=structured_block,
    head=lambda model, x: model.forward_head(model.norm(x)))


def swin_forward(model: DynamicSwin, x: torch.Tensor, keep_ratio: float = 0.7, return_trace: bool = False):
    """Structured pruned inference (see the module docstring). keep_ratio=1 reproduces ``model(x)``.

    Returns logits, or (logits, DynamicStageTrace) with ``return_trace``.
    """
    return hierarchical_forward(LAYOUT, model, x, keep_ratio, return_trace)


forward = swin_forward


# ---------------------------------------------------------------------------------------------
# Training forward: the official two-stream form with Gumbel-softmax masks
# ---------------------------------------------------------------------------------------------
def _two_stream_block(block: nn.Module, streams: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor):
    """The official AdaSwinTransformerBlock in training, on (B, H, W, C) streams and a (B, H, W, 1) mask.

    Attention runs on the mixed map; stream 1 takes the attended map at kept positions (its own values
    elsewhere) into the MLP, stream 2 the attended map at the other positions into the fast MLP; both
    residuals are added to the attended map.
    """
    first, second = streams
    x = first * mask + second * (1 - mask)
    x = x + block.drop_path1(window_attention(block, block.norm1(x)))
    first_in = x * mask + first * (1 - mask)
    second_in = x * (1 - mask) + second * mask
    return (x + block.drop_path2(block.mlp(block.norm2(first_in))),
            x + block.drop_path2(block.fastmlp(second_in)))


def swin_features_for_distillation(swin: SwinTransformer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain Swin's logits and final-norm features per last-stage position (B, N, C): the teacher's targets."""
    feats = swin.forward_features(x)
    return swin.forward_head(feats), feats.flatten(1, 2)


def swin_train_forward(model: DynamicSwin, x: torch.Tensor, tau: float = 1.0, keep_ratio: float = 0.7,
                       hard: bool = True, policy_override: Sequence[torch.Tensor] | None = None):
    """The official DynamicSwin training forward (``AdaSwinTransformer`` in training mode); see
    ``models.dynamic_convnext.convnext_train_forward``. ``keep_ratio`` only sets the loss targets."""
    x, decisions = hierarchical_train_stages(
        LAYOUT, model, x, _two_stream_block, mask_shape=lambda current: (*current.shape[:3], 1),
        tau=tau, hard=hard, policy_override=policy_override)
    x = model.norm(x)
    return HierarchicalTrainOutput(model.forward_head(x), x.flatten(1, 2), decisions,
                                   linear_targets(keep_ratio, len(model.pruning_locations)))


def official_pruning_locations(stage_depth: int) -> tuple[int, ...]:
    """The official predictor positions for a third stage of ``stage_depth`` blocks (T: 6, S/B: 18)."""
    return official_locations(SWIN_ARCHS, PRUNED_STAGE, stage_depth, "DynamicSwin", "Swin")
