"""EViT (Liang et al., ICLR 2022, "Not All Patches are What You Need") as an explicit forward over a timm ViT.

In a few blocks (the paper's DeiT setting: the 4th, 7th and 10th, 0-based 3, 6, 9) the patch tokens are ranked,
after the attention residual and before the MLP, by the attention the class token pays them (averaged over
heads). The ceil(keep_rate * n) most attended of the n non-prefix tokens stay, in that order (most attended
first); with ``fuse`` the others become one extra token at the end, their sum weighted by that attention (the
weights are not renormalised, as in the paper's code), which later blocks treat like any other token and may fuse
again. Prefix tokens (class, distillation, registers) always stay. Nothing is trained: the class token's attention
is the score, so EViT prunes meaningfully on any pretrained ViT with a class token.

Written from the paper and checked against its released code's decisions (keep count, ordering, unnormalised
fusion); nothing is copied. The model is only read; ``keep_rate = 1`` gives ``model(x)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

from models.registry import MethodNotApplicable
from models.scopes import REDUCTION, scope
from models.traces import ReductionTrace
from models.vit_forward import (
    attention_residual, classify, embed_tokens, gather_tokens, is_plain_block, mlp_residual,
)

PAPER_LOCATIONS = (3, 6, 9)  # 0-based blocks of a 12-block DeiT; scaled to other depths by ``prune_locations``


class NotApplicable(MethodNotApplicable):
    """The method does not apply to this model (said in one sentence)."""


def prune_locations(depth: int) -> tuple[int, ...]:
    """The paper's blocks 3, 6, 9 of 12, at the same fractions of another depth (distinct, after block 0)."""
    return tuple(sorted({max(1, round(b * depth / 12)) for b in PAPER_LOCATIONS} - {depth}))


def kept_count(tokens: int, keep_rate: float) -> int:
    """How many of ``tokens`` non-prefix tokens stay: ceil(keep_rate * tokens), at least one."""
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"EViT's keep rate must be in (0, 1], not {keep_rate}.")
    return max(1, math.ceil(keep_rate * tokens - 1e-9))


@dataclass
class EViTTrace(ReductionTrace):
    """What EViT did to a batch. Stage s is the pruning in block ``prune_blocks[s]``.

    ``tokens_per_block[b]``: tokens entering block b (prefix and any fused token included).
    ``own_token[s]`` [B, num_patches] bool: the patches still a token of their own after stage s (the others
    are in the fused token, or dropped without fusion).
    ``attention[s]`` [B, num_patches]: the class token's attention (mean over heads) to the token holding each
    patch when stage s decided (a patch in a fused token: that token's); NaN where the patch was dropped earlier.
    """

    keep_rate: float
    fuse: bool
    prune_blocks: tuple[int, ...]
    grid_size: tuple[int, int]
    num_prefix_tokens: int
    tokens_per_block: list[int] = field(default_factory=list)
    own_token: list[np.ndarray] = field(default_factory=list, repr=False)
    attention: list[np.ndarray] = field(default_factory=list, repr=False)

    @property
    def kept_counts(self) -> list[int]:
        """Patches of the first image still a token of their own after each stage (with fusion, a kept fused token
        can make this one fewer than the tokens kept)."""
        return [int(mask[0].sum()) for mask in self.own_token]


def check_supported(model: torch.nn.Module) -> None:
    """One sentence when EViT cannot run on the model."""
    if not isinstance(model, VisionTransformer):
        raise NotApplicable(f"EViT needs a timm VisionTransformer, not {type(model).__name__}.")
    if not getattr(model, "has_class_token", model.cls_token is not None):
        raise NotApplicable("EViT ranks patches by the class token's attention, and this model has no class token.")
    for index, block in enumerate(model.blocks):
        if not is_plain_block(block):
            raise NotApplicable(f"EViT walks timm's pre-norm Block with the standard Attention; block {index} is "
                                f"{type(block).__name__}.")


@scope(REDUCTION)
def keep_and_fuse(tokens: torch.Tensor, cls_attention: torch.Tensor, prefix: int, keep: int, fuse: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One EViT stage: tokens [B, N, C] and the class token's attention to the non-prefix ones [B, N - prefix].

    Returns the new tokens (prefix, the ``keep`` most attended in descending order, the fused token if ``fuse``),
    the positions kept [B, keep] and the positions left out [B, N - prefix - keep] (into the non-prefix tokens).
    """
    order = cls_attention.argsort(dim=1, descending=True, stable=True)
    kept, rest = order[:, :keep], order[:, keep:]
    body = tokens[:, prefix:]
    parts = [tokens[:, :prefix], gather_tokens(body, kept)]
    if fuse and rest.shape[1]:
        weights = cls_attention.gather(1, rest).unsqueeze(-1).to(tokens.dtype)
        parts.append((gather_tokens(body, rest) * weights).sum(dim=1, keepdim=True))
    return torch.cat(parts, dim=1), kept, rest


def evit_forward(model: VisionTransformer, x: torch.Tensor, keep_rate: float = 0.7, fuse: bool = True,
                 locations: Sequence[int] | None = None, return_trace: bool = False):
    """Logits of ``model`` on images ``x`` with EViT keeping ``keep_rate`` of the non-prefix tokens in each of
    ``locations`` (default: the paper's blocks, scaled to the model's depth). With ``return_trace`` also an
    ``EViTTrace``. Attention is materialised only in the pruning blocks; elsewhere it stays fused."""
    check_supported(model)
    depth = len(model.blocks)
    locations = tuple(prune_locations(depth) if locations is None else locations)
    prune = keep_rate < 1.0
    tokens = embed_tokens(model, x)
    batch, prefix = tokens.shape[0], model.num_prefix_tokens
    num_patches = tokens.shape[1] - prefix
    trace = EViTTrace(keep_rate, fuse, locations, tuple(model.patch_embed.grid_size), prefix) if return_trace else None
    # Which current token holds each original patch (-1: dropped), for the trace only.
    holder = torch.arange(num_patches, device=x.device).expand(batch, -1) if return_trace else None
    is_fused = torch.zeros(batch, num_patches, dtype=torch.bool, device=x.device) if return_trace else None
    for index, block in enumerate(model.blocks):
        if trace is not None:
            trace.tokens_per_block.append(tokens.shape[1])
        at_stage = prune and index in locations
        tokens, attended = attention_residual(block, tokens, record=at_stage)
        if at_stage:
            cls_attention = attended.maps[:, :, 0, prefix:].mean(dim=1)  # [B, N - prefix]
            keep = kept_count(cls_attention.shape[1], keep_rate)
            if keep < cls_attention.shape[1]:
                tokens, kept, rest = keep_and_fuse(tokens, cls_attention, prefix, keep, fuse)
                if trace is not None:
                    trace.attention.append(_attention_of(holder, cls_attention).float().cpu().numpy())
                    holder = _follow(holder, kept, rest, keep, fuse)
                    is_fused = torch.cat([is_fused.gather(1, kept), is_fused.new_ones(batch, int(fuse))], dim=1)
                    own = (holder >= 0) & ~is_fused.gather(1, holder.clamp(min=0))
                    trace.own_token.append(own.cpu().numpy())
        tokens = mlp_residual(block, tokens)
    logits = classify(model, tokens)
    return (logits, trace) if return_trace else logits


def _follow(holder: torch.Tensor, kept: torch.Tensor, rest: torch.Tensor, keep: int, fuse: bool) -> torch.Tensor:
    """Each patch's token after a stage: a kept token's new position, ``keep`` (the fused token) or -1."""
    batch, current = holder.shape[0], kept.shape[1] + rest.shape[1]
    moved = torch.full((batch, current + 1), -1, dtype=torch.long, device=holder.device)  # last slot: dropped
    moved.scatter_(1, kept, torch.arange(keep, device=holder.device).expand(batch, -1).contiguous())
    if fuse:
        moved.scatter_(1, rest, torch.full_like(rest, keep))
    return moved.gather(1, torch.where(holder < 0, current, holder))


def _attention_of(holder: torch.Tensor, cls_attention: torch.Tensor) -> torch.Tensor:
    """The class token's attention to the token holding each patch when the stage decided (NaN: dropped before)."""
    return torch.where(holder < 0, float("nan"), cls_attention.gather(1, holder.clamp(min=0)))
