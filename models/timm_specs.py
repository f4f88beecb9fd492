"""What a timm model name is, for names the registry does not list: its architecture, tag, class and input size.

``models.registry.get_spec`` asks here for any name it does not know (``vit_base_patch16_224.augreg_in21k_ft_in1k``,
``deit3_small_patch16_224``, ``vit_small_patch14_dinov2``, a model registered with timm's ``register_model``), and
builds a ModelSpec from the answer. Nothing is downloaded: the model is built on the meta device (no memory, no
initialisation), which is enough to read its class, its pretrained config and its token layout.
This module imports nothing of the project (the registry, the lowest module, imports it).
"""
from __future__ import annotations

from dataclasses import dataclass

NAME_EXAMPLE = "vit_base_patch16_224.augreg_in21k_ft_in1k"

# The kinds of timm model the project can run; models.registry maps each to its family.
VIT, EFFICIENTVIT_MSRA, SWIN, CNN = "vit", "efficientvit_msra", "swin", "cnn"

# Convolution-only timm classes (plain forwards: throughput, the frontier's baselines, the breakdown).
CNN_CLASSES = frozenset({
    "ResNet", "ConvNeXt", "MobileNetV3", "EfficientNet", "RegNet", "ByobNet", "DenseNet", "VGG", "GhostNet",
    "MobileNetV4", "RepVit", "FastVit", "Xception", "XceptionAligned", "DLA", "DPN", "HRNet", "RexNet", "TinyNet",
    "CspNet", "GhostNetV3", "ResNetV2", "SelecSls", "SkNet", "Res2Net", "MobileOne", "HGNet", "InceptionV3",
    "InceptionV4", "InceptionResnetV2", "NFNet", "NormFreeNet", "EdgeNeXt", "ConvMixer", "MambaOut",
})
SUPPORTED = ("timm VisionTransformer and its subclasses (ViT, DeiT, DeiT III, DINOv2, register and "
             "class-token-free variants), EfficientViT (MSRA), Swin Transformer and convolutional networks "
             "(ResNet, ConvNeXt, MobileNetV3, EfficientNet, ...)")


class NoSuchTimmModel(LookupError):
    """timm has no model (or no such pretrained tag) under the name."""


class UnsupportedTimmClass(ValueError):
    """timm builds the model, but its class is none the project can run."""


@dataclass(frozen=True)
class TimmArch:
    name: str               # as the user typed it (architecture, or architecture.tag)
    architecture: str       # timm's model function name
    tag: str | None         # the pretrained tag: the typed one, else timm's default for the architecture
    kind: str               # VIT, EFFICIENTVIT_MSRA, SWIN or CNN
    class_name: str
    input_size: int         # the side the pretrained config (or the patch embedding) expects
    num_classes: int        # 0: a feature extractor without a classification head (DINOv2)


def _kind(model) -> str | None:
    from timm.models.efficientvit_msra import EfficientVitMsra
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return VIT
    if isinstance(model, EfficientVitMsra):
        return EFFICIENTVIT_MSRA
    if isinstance(model, SwinTransformer):
        return SWIN
    if type(model).__name__ in CNN_CLASSES:
        return CNN
    return None


def describe(name: str) -> TimmArch:
    """The timm model ``name`` (with or without ``.tag``), without downloading or initialising anything.

    Raises NoSuchTimmModel for a name timm does not know, UnsupportedTimmClass for a class the project cannot run.
    """
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    from .device import on_meta

    architecture, tag = split_model_name_tag(name.strip())
    if not name.strip() or not timm.is_model(architecture):
        raise NoSuchTimmModel(f"timm has no model {name!r}; names look like {NAME_EXAMPLE}.")
    try:
        cfg = get_pretrained_cfg(f"{architecture}.{tag}" if tag else architecture)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{architecture}.*")]
        raise NoSuchTimmModel(f"timm has no pretrained tag {tag!r} for {architecture}; its tags: "
                              f"{', '.join(tags) or 'none'}.") from None
    try:
        with on_meta():
            model = timm.create_model(f"{architecture}.{tag}" if tag else architecture, pretrained=False)
    except Exception as exc:  # noqa: BLE001 - a model function that fails to build is reported, not raised through
        raise UnsupportedTimmClass(f"timm could not build {name}: {type(exc).__name__}: {exc}") from exc
    kind = _kind(model)
    if kind is None:
        raise UnsupportedTimmClass(f"{name} is a timm {type(model).__name__}, which this app does not run; "
                                   f"it runs {SUPPORTED}.")
    sizes = getattr(cfg, "input_size", None) or (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    if kind == VIT:  # the position embedding fixes the size the model was built for
        size = int(model.patch_embed.img_size[0])
    else:
        size = int(sizes[-1]) if sizes else 224
    return TimmArch(name=name, architecture=architecture, tag=tag or getattr(cfg, "tag", None) or None, kind=kind,
                    class_name=type(model).__name__, input_size=size, num_classes=int(model.num_classes))
