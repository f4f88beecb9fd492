"""Walking a timm VisionTransformer with its own submodules: the one place that reads timm's internals.

Token reduction (ToMe, DynamicViT) and attention recording all need a ViT forward they can stop between
blocks, or inside a block between attention and MLP. They build it from the functions here, which call
the model's own submodules in the order timm's ``VisionTransformer.forward_features``, ``Block.forward``
and ``Attention.forward`` do, so with nothing reduced and nothing recorded the result is ``model(x)``
(``tests/test_vit_forward.py`` checks that against the installed timm).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from models.scopes import ATTENTION, scope

POLICY_EPS = 1e-6  # DynamicViT's masked-softmax epsilon


def embed_tokens(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] -> tokens entering the first block (patch embedding, prefix tokens, position embedding)."""
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))


def vit_config(vit: VisionTransformer) -> dict:
    """The constructor arguments that rebuild ``vit``'s architecture (weights are copied separately)."""
    block = vit.blocks[0]
    attn = block.attn
    return dict(
        img_size=vit.patch_embed.img_size, patch_size=vit.patch_embed.patch_size,
        in_chans=vit.patch_embed.proj.in_channels, num_classes=vit.num_classes,
        embed_dim=vit.embed_dim, depth=len(vit.blocks), num_heads=attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / vit.embed_dim, qkv_bias=attn.qkv.bias is not None,
        qk_norm=not isinstance(attn.q_norm, nn.Identity),
        init_values=block.ls1.gamma.detach().abs().mean().item() if hasattr(block.ls1, "gamma") else None,
        pre_norm=not isinstance(vit.norm_pre, nn.Identity), no_embed_class=vit.no_embed_class,
        global_pool=vit.global_pool,
    )


def token_count(model: VisionTransformer) -> int:
    """Tokens entering the first block: the patches plus the prefix (class, distillation, register) tokens."""
    return model.patch_embed.num_patches + model.num_prefix_tokens


def classify(model: VisionTransformer, tokens: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens after the last block -> logits (final norm, pooling, head).

    ``sizes`` [B, N, 1] (merged tokens: the patches each holds) makes a model's global average pooling weight each
    token by its size, so the mean stays one over the original patches; other pooling is timm's own.
    """
    tokens = model.norm(tokens)
    if sizes is None or model.attn_pool is not None or model.global_pool != "avg" or model.pool_include_prefix:
        return model.forward_head(tokens)
    prefix = model.num_prefix_tokens
    weights = sizes[:, prefix:].to(tokens.dtype)
    pooled = (tokens[:, prefix:] * weights).sum(dim=1) / weights.sum(dim=1)
    return model.head(model.head_drop(model.fc_norm(pooled)))


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-image selection along the token axis: [B, N, C] and [B, K] -> [B, K, C].

    Whole rows are copied with ``index_select`` over the flattened batch: on CPU 4-8x faster than
    ``gather`` with an index expanded over the channels, which reads one index per element.
    """
    batch, count, channels = tokens.shape
    offsets = torch.arange(0, batch * count, count, device=index.device).unsqueeze(1)
    rows = tokens.reshape(batch * count, channels).index_select(0, (index + offsets).reshape(-1))
    return rows.reshape(batch, index.shape[1], channels)


def is_plain_block(block: torch.nn.Module) -> bool:
    """True for timm's pre-norm ``Block`` with the standard ``Attention``: the block these functions walk."""
    return type(block) is Block and isinstance(block.attn, Attention)


# ---------------------------------------------------------------------------------------------- attention
class AttentionResult(NamedTuple):
    """What one attention call computed. ``maps`` is set only when recording was asked for."""

    out: torch.Tensor           # [B, N, C]: after the output projection, as ``Attention.forward`` returns
    keys: torch.Tensor          # [B, H, N, head_dim]: keys after k_norm (ToMe's similarity metric)
    heads: torch.Tensor         # [B, H, N, head_dim]: each head's output before the heads are concatenated
    maps: torch.Tensor | None   # [B, H, N, N]: attention weights (softmax over keys), before dropout


def policy_softmax(logits: torch.Tensor, policy: torch.Tensor, eps: float = POLICY_EPS) -> torch.Tensor:
    """Softmax over keys where dropped keys are masked out multiplicatively, differentiably in ``policy``.

    Hand-written because SDPA has no multiplicative, differentiable key gate: G = p_j + (1 - p_j) * I
    (a dropped query still sees the kept keys and itself), A = exp(S - max) * G, A = (A + eps/N) / (sum A + eps).
    logits: [B, H, N, N]; policy: [B, N].
    """
    n = logits.shape[-1]
    keep = policy[:, None, None, :].float()
    eye = torch.eye(n, dtype=keep.dtype, device=keep.device)
    gate = keep + (1.0 - keep) * eye
    weights = (logits - logits.amax(dim=-1, keepdim=True)).float().exp() * gate
    return ((weights + eps / n) / (weights.sum(dim=-1, keepdim=True) + eps)).to(logits.dtype)


@scope(ATTENTION)
def attention(attn: Attention, x: torch.Tensor, *, key_bias: torch.Tensor | None = None,
              policy: torch.Tensor | None = None, record: bool = False) -> AttentionResult:
    """timm's ``Attention`` forward on ``x`` [B, N, C] from its own submodules, with three options.

    ``key_bias`` (broadcastable to [B, H, N, N], e.g. ToMe's log size [B, 1, 1, N]) is added to the logits;
    ``policy`` [B, N] (DynamicViT training) replaces the softmax with :func:`policy_softmax`; ``record``
    materialises and returns the attention weights. Without ``policy`` and ``record`` attention stays fused
    (``scaled_dot_product_attention``, the key bias passed as a float mask).
    """
    batch, tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None  # newer timm only
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    maps = None
    if policy is None and not record:
        dropout = attn.attn_drop.p if attn.training else 0.0
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias, dropout_p=dropout)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if key_bias is not None:
            logits = logits + key_bias
        maps = logits.softmax(dim=-1) if policy is None else policy_softmax(logits, policy)
        heads = attn.attn_drop(maps) @ v
    out = attn.norm(heads.transpose(1, 2).reshape(batch, tokens, attn.num_heads * attn.head_dim))
    if gate is not None:
        out = out * gate
    return AttentionResult(attn.proj_drop(attn.proj(out)), k, heads, maps)


def attention_residual(block: Block, x: torch.Tensor, **options) -> tuple[torch.Tensor, AttentionResult]:
    """The first half of timm's ``Block``: ``x + drop_path(ls(attn(norm1(x))))``; options go to :func:`attention`."""
    result = attention(block.attn, block.norm1(x), **options)
    return x + block.drop_path1(block.ls1(result.out)), result


def mlp_residual(block: Block, x: torch.Tensor) -> torch.Tensor:
    """The second half of timm's ``Block``: ``x + drop_path(ls(mlp(norm2(x))))``."""
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def window_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A timm Swin block's (shifted) window attention on its (B, H, W, C) input, residual not added: timm's
    private ``SwinTransformerBlock._attn``, called here so that no other module reaches into timm's blocks."""
    return block._attn(x)
