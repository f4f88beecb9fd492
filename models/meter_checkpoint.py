"""The official METER checkpoint's tensor names mapped to ``models.meter``'s (transformers' CLIP, RoBERTa and
the fusion layers under their official names): renames, q/k/v split, unused keys, and the position embedding resized
to the fine-tuned image size. ``models.meter`` builds the model and loads the mapped state dict strictly.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from models.checkpoints import CheckpointError

# Official key -> ours, for the parts whose names differ (CLIP's own module names -> transformers' CLIP).
# Everything else (RoBERTa, fusion layers, transforms, poolers, head) has the same name on both sides.
_CLIP_BLOCK = "vit_model.visual.transformer.resblocks.{i}."
_OURS_BLOCK = "vit_model.encoder.layers.{i}."
KEY_TABLE: tuple[tuple[str, str], ...] = (
    ("vit_model.visual.conv1.weight", "vit_model.embeddings.patch_embedding.weight"),
    ("vit_model.visual.class_embedding", "vit_model.embeddings.class_embedding"),
    ("vit_model.visual.positional_embedding", "vit_model.embeddings.position_embedding.weight"),
    ("vit_model.visual.ln_pre.", "vit_model.pre_layrnorm."),
    ("vit_model.visual.ln_post.", "vit_model.post_layernorm."),
    (_CLIP_BLOCK + "ln_1.", _OURS_BLOCK + "layer_norm1."),
    (_CLIP_BLOCK + "ln_2.", _OURS_BLOCK + "layer_norm2."),
    (_CLIP_BLOCK + "attn.out_proj.", _OURS_BLOCK + "self_attn.out_proj."),
    (_CLIP_BLOCK + "mlp.c_fc.", _OURS_BLOCK + "mlp.fc1."),
    (_CLIP_BLOCK + "mlp.c_proj.", _OURS_BLOCK + "mlp.fc2."),
)
# nn.MultiheadAttention packs q, k, v in one matrix; transformers' CLIP has three projections.
IN_PROJ = ((_CLIP_BLOCK + "attn.in_proj_weight", _OURS_BLOCK + "self_attn.{p}_proj.weight"),
           (_CLIP_BLOCK + "attn.in_proj_bias", _OURS_BLOCK + "self_attn.{p}_proj.bias"))
# In the checkpoint but unused by METER's forward: CLIP's text-side parameters that METER's CLIP wrapper keeps,
# and transformers' position-id buffers (persistent in the transformers version METER used).
UNUSED_KEYS = ("vit_model.token_embedding.weight", "vit_model.positional_embedding", "vit_model.ln_final.weight",
               "vit_model.ln_final.bias", "vit_model.visual.proj", "vit_model.text_projection",
               "vit_model.logit_scale", "text_transformer.embeddings.position_ids",
               "text_transformer.embeddings.token_type_ids")


def _map_key(key: str) -> str | None:
    """Our name for an official name that ``KEY_TABLE`` renames, else None."""
    for official, ours in KEY_TABLE:
        if "{i}" in official:
            head, tail = official.split("{i}")
            index, dot, rest = key[len(head):].partition(".") if key.startswith(head) else ("", "", "")
            if index.isdigit() and (dot + rest).startswith(tail):
                return ours.format(i=index) + (dot + rest)[len(tail):]
        elif official.endswith(".") and key.startswith(official):
            return ours + key[len(official):]
        elif key == official:
            return ours
    return None


def official_to_ours(state_dict: Mapping[str, torch.Tensor], image_size: int | None = None
                     ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map an official METER state dict to this module's names: rename CLIP keys by ``KEY_TABLE``, split
    ``in_proj`` into q/k/v, drop ``UNUSED_KEYS``, keep every other key unchanged (a wrong file then shows up as
    missing/unexpected keys in the strict load). With ``image_size``, the position embedding is resized
    bicubically to that grid, as METER does when it loads a checkpoint. Returns (state dict, dropped keys)."""
    ours: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in state_dict.items():
        if key in UNUSED_KEYS:
            dropped.append(key)
            continue
        split = _split_in_proj(key, value)
        if split is not None:
            ours.update(split)
            continue
        mapped = _map_key(key)
        ours[mapped if mapped is not None else key] = value
    pos_key = "vit_model.embeddings.position_embedding.weight"
    if image_size is not None and pos_key in ours:
        ours[pos_key] = resize_position_embedding(ours[pos_key], image_size // _patch_size(ours))
    return ours, dropped


def _split_in_proj(key: str, value: torch.Tensor) -> dict[str, torch.Tensor] | None:
    for official, ours in IN_PROJ:
        head, tail = official.split("{i}")
        if key.startswith(head) and key.endswith(tail):
            index = key[len(head):-len(tail)]
            if index.isdigit():
                return {ours.format(i=index, p=p): part for p, part in zip("qkv", value.chunk(3, dim=0))}
    return None


def _patch_size(state_dict: Mapping[str, torch.Tensor]) -> int:
    return int(state_dict["vit_model.embeddings.patch_embedding.weight"].shape[-1])


def resize_position_embedding(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1 + g*g, C) -> (1 + grid*grid, C): bicubic resize of the patch part, class position kept."""
    before = int(round((pos.shape[0] - 1) ** 0.5))
    if before == grid:
        return pos
    if before * before != pos.shape[0] - 1:
        raise CheckpointError(f"The position embedding has {pos.shape[0]} rows, not 1 + a square grid.")
    patches = pos[1:].reshape(before, before, -1).permute(2, 0, 1)[None].float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic")[0].permute(1, 2, 0).reshape(grid * grid, -1)
    return torch.cat([pos[:1], patches.to(pos.dtype)], dim=0)
