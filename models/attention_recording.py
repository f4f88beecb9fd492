"""Recording forwards: run a timm ViT/DeiT or EfficientViT (MSRA) and keep per-head attention maps and outputs.

Both forwards walk the model's own blocks and call its own submodules, so with nothing recorded they
return exactly ``model(x)``. Attention is materialised only in recorded blocks; every other block runs
its own (fused) forward. Nothing is set on the model: all settings are arguments.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from models.registry import MethodNotApplicable
from models.vit_forward import attention_residual, classify, embed_tokens, is_plain_block, mlp_residual

MHSA = "mhsa"
CGA = "cga"


class UnsupportedModelError(MethodNotApplicable, TypeError):
    """The model is neither a timm VisionTransformer nor a timm EfficientVitMsra, or has blocks the walk does not
    reproduce."""


@dataclass
class BlockAttention:
    """What one attention block did on a batch.

    ``maps`` is [B*windows, H, n, n] (rows are queries, softmax over keys); ``head_outputs`` is
    [B*windows, H, n, d_head]. For MHSA there is one "window" per image holding every token (prefix tokens
    first); for cascaded group attention the rows are the (image, window-row, window-col) windows in that order.
    """

    block: int
    stage: int
    kind: str
    batch_size: int
    num_heads: int
    grid: tuple[int, int]
    window: int | None = None
    windows: tuple[int, int] = (1, 1)
    num_prefix_tokens: int = 0
    has_class_token: bool = True  # MHSA: prefix token 0 is a class token (False: registers only, or no prefix)
    maps: torch.Tensor | None = None
    head_outputs: torch.Tensor | None = None

    @property
    def windows_per_image(self) -> int:
        return self.windows[0] * self.windows[1]


@dataclass
class AttentionRecord:
    """Recorded blocks of one forward, plus the model's block layout (for relative depth)."""

    kind: str
    num_blocks: int
    stage_of_block: tuple[int, ...]
    blocks: list[BlockAttention] = field(default_factory=list)

    def relative_depth(self, block: int) -> float:
        """Block position in [0, 1]: 0 for the first attention block, 1 for the last."""
        return block / max(1, self.num_blocks - 1)


def attention_kind(model: nn.Module) -> str:
    """'mhsa' for timm VisionTransformer (DeiT included), 'cga' for timm EfficientVitMsra."""
    from timm.models.efficientvit_msra import EfficientVitMsra
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return MHSA
    if isinstance(model, EfficientVitMsra):
        return CGA
    raise UnsupportedModelError(
        f"Attention recording supports timm VisionTransformer/DeiT and EfficientViT (MSRA) models, "
        f"not {type(model).__name__}."
    )


def record_attention(
    model: nn.Module,
    x: torch.Tensor,
    blocks: Iterable[int] | None = None,
    *,
    store_maps: bool = True,
    store_head_outputs: bool = True,
) -> tuple[torch.Tensor, AttentionRecord]:
    """Run ``model`` on ``x`` and record attention in ``blocks`` (indices of attention blocks; None = all).

    Returns (logits, record); stored tensors are float32 on the CPU. Runs under ``torch.inference_mode``
    and follows eval-mode semantics (no dropout / stochastic depth).
    """
    kind = attention_kind(model)
    stages = _block_stages(model, kind)
    wanted = set(range(len(stages))) if blocks is None else set(blocks)
    bad = sorted(b for b in wanted if not 0 <= b < len(stages))
    if bad:
        raise IndexError(f"Blocks {bad} do not exist; the model has {len(stages)} attention blocks.")
    options = dict(store_maps=store_maps, store_head_outputs=store_head_outputs)
    with torch.inference_mode():
        if kind == MHSA:
            logits, recorded = _vit_forward(model, x, wanted, **options)
        else:
            logits, recorded = _efficientvit_forward(model, x, wanted, **options)
    return logits, AttentionRecord(kind, len(stages), tuple(stages), recorded)


def _block_stages(model: nn.Module, kind: str) -> list[int]:
    """Stage id of every attention block in model order (all 0 for a plain ViT)."""
    if kind == MHSA:
        return [0] * len(model.blocks)
    return [s for s, stage in enumerate(model.stages) for _ in stage.blocks]


def _to_cpu(t: torch.Tensor | None, keep: bool) -> torch.Tensor | None:
    return t.detach().float().cpu() if keep and t is not None else None


# ----------------------------------------------------------------------------- ViT / DeiT (MHSA)

def _check_vit_block(block: nn.Module) -> None:
    if not is_plain_block(block):
        raise UnsupportedModelError(
            f"Recording needs pre-norm timm ViT blocks with timm Attention; got {type(block).__name__}."
        )


def _vit_forward(model, x, wanted, *, store_maps, store_head_outputs):
    patch_h, patch_w = model.patch_embed.patch_size
    grid = (x.shape[-2] // patch_h, x.shape[-1] // patch_w)
    h = embed_tokens(model, x)
    recorded = []
    for index, block in enumerate(model.blocks):
        if index not in wanted:
            h = block(h)
            continue
        _check_vit_block(block)
        h, result = attention_residual(block, h, record=True)
        h = mlp_residual(block, h)
        maps, heads = result.maps, result.heads
        recorded.append(BlockAttention(
            block=index, stage=0, kind=MHSA, batch_size=x.shape[0], num_heads=maps.shape[1], grid=grid,
            num_prefix_tokens=model.num_prefix_tokens, has_class_token=getattr(model, "cls_token", None) is not None,
            maps=_to_cpu(maps, store_maps), head_outputs=_to_cpu(heads, store_head_outputs),
        ))
    return classify(model, h), recorded


# ----------------------------------------------------------------------------- EfficientViT (CGA)

@dataclass(frozen=True)
class WindowLayout:
    """How a [B, C, H, W] map was cut into ws x ws windows (zero-padded at the bottom/right)."""

    batch: int
    height: int
    width: int
    window: int
    rows: int
    cols: int


def to_windows(x: torch.Tensor, window: int) -> tuple[torch.Tensor, WindowLayout]:
    """[B, C, H, W] -> [B*rows*cols, C, ws, ws], windows ordered (image, row, col) as in timm's LocalWindowAttention."""
    B, C, H, W = x.shape
    pad_b, pad_r = (window - H % window) % window, (window - W % window) % window
    x = F.pad(x.permute(0, 2, 3, 1), (0, 0, 0, pad_r, 0, pad_b))
    rows, cols = (H + pad_b) // window, (W + pad_r) // window
    x = x.view(B, rows, window, cols, window, C).transpose(2, 3)
    x = x.reshape(B * rows * cols, window, window, C).permute(0, 3, 1, 2)
    return x, WindowLayout(B, H, W, window, rows, cols)


def from_windows(x: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """Inverse of :func:`to_windows`: stitch windows back and drop the padding."""
    L = layout
    C = x.shape[1]
    x = x.permute(0, 2, 3, 1).view(L.batch, L.rows, L.cols, L.window, L.window, C)
    x = x.transpose(2, 3).reshape(L.batch, L.rows * L.window, L.cols * L.window, C)
    return x[:, : L.height, : L.width].permute(0, 3, 1, 2).contiguous()


def cga_attention(cga: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm ``CascadedGroupAttention`` on windows [Bw, C, ws, ws], keeping each head's softmax and output.

    Head i attends over its own channel split plus head i-1's output; q passes the head's depthwise conv;
    each head adds its own relative-position bias. Returns (output, maps [Bw, H, n, n], heads [Bw, H, n, d_v]).
    """
    B, _, H, W = x.shape
    splits = x.chunk(len(cga.qkvs), dim=1)
    # Indexed directly rather than via get_attention_biases(), which writes a cache on the (shared) model.
    biases = cga.attention_biases[:, cga.attention_bias_idxs]
    feat, outputs, maps = splits[0], [], []
    for head, (qkv, dw) in enumerate(zip(cga.qkvs, cga.dws)):
        if head > 0:
            feat = feat + splits[head]
        q, k, v = qkv(feat).view(B, -1, H, W).split([cga.key_dim, cga.key_dim, cga.val_dim], dim=1)
        q, k, v = dw(q).flatten(2), k.flatten(2), v.flatten(2)
        attn = ((q * cga.scale).transpose(-2, -1) @ k + biases[head]).softmax(dim=-1)
        feat = (v @ attn.transpose(-2, -1)).view(B, cga.val_dim, H, W)
        outputs.append(feat)
        maps.append(attn)
    out = cga.proj(torch.cat(outputs, dim=1))
    heads = torch.stack([o.flatten(2).transpose(1, 2) for o in outputs], dim=1)
    return out, torch.stack(maps, dim=1), heads


def _efficientvit_block_recorded(block: nn.Module, x: torch.Tensor):
    """Sandwich block (DWConv+FFN, window attention, DWConv+FFN) as timm's ``EfficientVitBlock`` in eval mode."""
    x = block.ffn0(block.dw0(x))
    local = block.mixer.m
    windows, layout = to_windows(x, local.attn.resolution)
    out, maps, heads = cga_attention(local.attn, windows)
    x = x + from_windows(out, layout)  # the mixer's ResidualDrop in eval mode
    return block.ffn1(block.dw1(x)), maps, heads, layout


def _efficientvit_forward(model, x, wanted, *, store_maps, store_head_outputs):
    h = model.patch_embed(x)
    recorded, index = [], 0
    for stage_id, stage in enumerate(model.stages):
        h = stage.downsample(h)
        for block in stage.blocks:
            if index in wanted:
                h, maps, heads, layout = _efficientvit_block_recorded(block, h)
                recorded.append(BlockAttention(
                    block=index, stage=stage_id, kind=CGA, batch_size=x.shape[0], num_heads=maps.shape[1],
                    grid=(layout.height, layout.width), window=layout.window, windows=(layout.rows, layout.cols),
                    maps=_to_cpu(maps, store_maps), head_outputs=_to_cpu(heads, store_head_outputs),
                ))
            else:
                h = block(h)
            index += 1
    return model.forward_head(h), recorded
