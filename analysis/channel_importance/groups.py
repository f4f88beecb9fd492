"""Which channels a pruner would remove together, per architecture: the embedding, Q, K, V, proj and FFN
groups of a timm ViT/DeiT, and the cascaded-attention, depthwise and FFN groups of an EfficientViT (MSRA)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from models.registry import MethodNotApplicable

COMPONENTS = ("embed", "q", "k", "v", "q_dw", "proj", "ffn_hidden", "dw")
EMBED_BLOCK = -1


@dataclass(frozen=True)
class ParamSlice:
    """Output channels [start, stop) of one parameter, indexed along ``channel_dim``."""

    name: str
    start: int
    stop: int
    channel_dim: int = 0


@dataclass(frozen=True)
class ChannelGroup:
    """One prunable unit (e.g. block 3, V of head 1): its channels in a layer's output and its parameters."""

    block: int
    relative_depth: float
    component: str
    head: int
    layer: str  # module whose output holds these channels (for the activation variant)
    start: int
    stop: int
    channel_dim: int  # dim of that module's output that indexes channels: -1 for tokens, 1 for NCHW
    params: tuple[ParamSlice, ...]

    @property
    def size(self) -> int:
        return self.stop - self.start


def _relative_depth(index: int, count: int) -> float:
    return index / max(1, count - 1)


def _own_params(module: nn.Module, path: str, start: int, stop: int) -> list[ParamSlice]:
    """Weight rows and bias entries [start, stop) of a Linear/Conv (output channels are dim 0)."""
    slices = [ParamSlice(f"{path}.weight", start, stop)]
    if getattr(module, "bias", None) is not None:
        slices.append(ParamSlice(f"{path}.bias", start, stop))
    return slices


def _linear_group(block: int, depth: float, component: str, path: str, module: nn.Module,
                  head: int = -1, start: int = 0, stop: int | None = None) -> ChannelGroup:
    stop = module.weight.shape[0] if stop is None else stop
    return ChannelGroup(block, depth, component, head, path, start, stop, -1,
                        tuple(_own_params(module, path, start, stop)))


def _convnorm_group(block: int, depth: float, component: str, path: str, module: nn.Module,
                    head: int = -1, start: int = 0, stop: int | None = None) -> ChannelGroup:
    """A timm ConvNorm (conv without bias, then BN): conv rows plus BN weight and bias of the channel."""
    stop = module.conv.weight.shape[0] if stop is None else stop
    params = (ParamSlice(f"{path}.conv.weight", start, stop),
              ParamSlice(f"{path}.bn.weight", start, stop),
              ParamSlice(f"{path}.bn.bias", start, stop))
    return ChannelGroup(block, depth, component, head, path, start, stop, 1, params)


def is_vit(model: nn.Module) -> bool:
    blocks = getattr(model, "blocks", None)
    return (hasattr(model, "patch_embed") and isinstance(blocks, nn.Sequential) and len(blocks) > 0
            and all(hasattr(b, "attn") and hasattr(b.attn, "qkv") and hasattr(b, "mlp") for b in blocks))


def is_efficientvit_msra(model: nn.Module) -> bool:
    from timm.models.efficientvit_msra import EfficientVitMsra

    return isinstance(model, EfficientVitMsra)


def _vit_embed_group(model: nn.Module) -> ChannelGroup:
    proj = model.patch_embed.proj
    width = proj.weight.shape[0]
    params = _own_params(proj, "patch_embed.proj", 0, width)
    for token in ("cls_token", "dist_token", "reg_token", "pos_embed"):
        if isinstance(getattr(model, token, None), nn.Parameter):
            params.append(ParamSlice(token, 0, width, channel_dim=-1))
    return ChannelGroup(EMBED_BLOCK, 0.0, "embed", -1, "patch_embed", 0, width, -1, tuple(params))


def _vit_qkv_groups(block: int, depth: float, attn: nn.Module, path: str) -> list[ChannelGroup]:
    """The qkv Linear's rows are laid out (q|k|v, head, head_dim), as timm's Attention reshapes them."""
    heads, head_dim = attn.num_heads, attn.qkv.weight.shape[0] // (3 * attn.num_heads)
    width = heads * head_dim
    return [_linear_group(block, depth, comp, path, attn.qkv, head=h,
                          start=c * width + h * head_dim, stop=c * width + (h + 1) * head_dim)
            for c, comp in enumerate(("q", "k", "v")) for h in range(heads)]


def _vit_groups(model: nn.Module) -> list[ChannelGroup]:
    count = len(model.blocks)
    groups = [_vit_embed_group(model)]
    for i, blk in enumerate(model.blocks):
        depth = _relative_depth(i, count)
        groups += _vit_qkv_groups(i, depth, blk.attn, f"blocks.{i}.attn.qkv")
        groups.append(_linear_group(i, depth, "proj", f"blocks.{i}.attn.proj", blk.attn.proj))
        groups.append(_linear_group(i, depth, "ffn_hidden", f"blocks.{i}.mlp.fc1", blk.mlp.fc1))
    return groups


def _cascaded_attention_groups(block: int, depth: float, attn: nn.Module, path: str) -> list[ChannelGroup]:
    """Each head's qkv ConvNorm outputs (q | k | v) = (key_dim | key_dim | val_dim); q then goes through dws[h]."""
    kd, vd = attn.key_dim, attn.val_dim
    groups = []
    for h, qkv in enumerate(attn.qkvs):
        for comp, (start, stop) in zip(("q", "k", "v"), ((0, kd), (kd, 2 * kd), (2 * kd, 2 * kd + vd))):
            groups.append(_convnorm_group(block, depth, comp, f"{path}.qkvs.{h}", qkv, h, start, stop))
        groups.append(_convnorm_group(block, depth, "q_dw", f"{path}.dws.{h}", attn.dws[h], h))
    groups.append(_convnorm_group(block, depth, "proj", f"{path}.proj.1", attn.proj[1]))
    return groups


def _efficientvit_groups(model: nn.Module) -> list[ChannelGroup]:
    from timm.models.efficientvit_msra import EfficientVitBlock

    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, EfficientVitBlock)]
    groups = [_convnorm_group(EMBED_BLOCK, 0.0, "embed", "patch_embed.conv4", model.patch_embed.conv4)]
    for i, (path, blk) in enumerate(blocks):
        depth = _relative_depth(i, len(blocks))
        groups.append(_convnorm_group(i, depth, "dw", f"{path}.dw0.m", blk.dw0.m))
        groups.append(_convnorm_group(i, depth, "ffn_hidden", f"{path}.ffn0.m.pw1", blk.ffn0.m.pw1))
        groups += _cascaded_attention_groups(i, depth, blk.mixer.m.attn, f"{path}.mixer.m.attn")
        groups.append(_convnorm_group(i, depth, "dw", f"{path}.dw1.m", blk.dw1.m))
        groups.append(_convnorm_group(i, depth, "ffn_hidden", f"{path}.ffn1.m.pw1", blk.ffn1.m.pw1))
    return groups


def channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """Every prunable channel group of a timm ViT/DeiT or EfficientViT (MSRA) model with a classification head."""
    if getattr(model, "num_classes", None) == 0:
        raise MethodNotApplicable("Taylor importance needs a classification loss, and this model has no "
                                  "classification head (timm num_classes=0: a feature backbone such as DINOv2).")
    if is_efficientvit_msra(model):
        return _efficientvit_groups(model)
    if is_vit(model):
        return _vit_groups(model)
    raise MethodNotApplicable(f"Channel importance supports timm ViT/DeiT and EfficientViT (MSRA) models, "
                              f"not {type(model).__name__}.")
