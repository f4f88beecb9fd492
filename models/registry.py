"""Named models: family, attention kind, where the weights live and published reference figures.

The lowest module of the package: it imports nothing of the project, so everything else may import it.
Token-reduction methods are not models: ``models.methods`` says which method applies to which family.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field, replace

# Families: which token-reduction methods apply (models.methods) and how a model is built and fed.
# MHSA and CGA double as the attention kinds that the recording forwards and the analyses dispatch on.
MHSA = "mhsa"
CGA = "cga"
CNN = "cnn"
SWIN = "swin"
DYNAMICVIT = "dynamicvit"
# DynamicViT's zoo (T-PAMI extension): LV-ViT drops tokens like DeiT; ConvNeXt and Swin keep the feature map
# and run only the kept positions' MLPs (models.dynamic_convnext, models.dynamic_swin).
DYNAMIC_LVVIT = "dynamic-lvvit"
DYNAMIC_CNN = "dynamic-cnn"
DYNAMIC_SWIN = "dynamic-swin"
VILT = "vilt"
METER = "meter"

FAMILY_LABELS = {
    MHSA: "ViT / DeiT (multi-head self-attention)",
    CGA: "EfficientViT (cascaded group attention)",
    CNN: "CNN",
    SWIN: "Swin Transformer (window attention)",
    DYNAMICVIT: "DynamicViT (DeiT + score predictors)",
    DYNAMIC_LVVIT: "DynamicViT (LV-ViT + score predictors)",
    DYNAMIC_CNN: "DynamicCNN (ConvNeXt + score predictors)",
    DYNAMIC_SWIN: "DynamicSwin (Swin + score predictors)",
    VILT: "ViLT (vision-language)",
    METER: "METER (vision-language)",
}

# The family of the plain backbone a token-pruning family is built on (LV-ViT's backbone is no registry family).
BACKBONE_FAMILIES = {DYNAMICVIT: MHSA, DYNAMIC_CNN: CNN, DYNAMIC_SWIN: SWIN}

# PuMer's throughput protocol (ACL 2023, section 4): the batch grows from a start in steps until out of memory and the
# best batch's throughput counts; (start, step) per family. ``batch_growth`` reads it; nothing else names the numbers.
BATCH_GROWTH = {VILT: (32, 8), METER: (16, 8)}


def batch_growth(family: str) -> tuple[int, int] | None:
    """(first batch, step) of the paper's throughput protocol for a family; None where the paper gives none."""
    return BATCH_GROWTH.get(family)


# What a model's forward takes; the throughput harness builds inputs of this kind.
IMAGE_INPUTS = "image"
VQA_INPUTS = "image+question"

# What a model does: the pages offer a model only where its task fits (the frontier ranks image classifiers).
IMAGE_CLASSIFICATION = "image classification"
IMAGE_FEATURES = "image features"  # a backbone without a classification head (timm num_classes=0, e.g. DINOv2)
VISUAL_QUESTION_ANSWERING = "visual question answering"

# How released weights are stored: one checkpoint file, or a transformers save_pretrained folder.
FILE, FOLDER = "file", "folder"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    timm_id: str | None = None
    pretrained_tag: str | None = None
    # Published ImageNet-1k top-1 and V100 throughput, with where they come from.
    top1: float | None = None
    paper_img_s: float | None = None
    reference: str = ""
    # For models timm does not define: "module:function" building a random-init model, and the official URL.
    factory: str | None = None
    factory_kwargs: dict = field(default_factory=dict)
    url: str | None = None
    # "module:function(model, path)" loading a checkpoint file; default: timm's converter + strict load.
    load_fn: str | None = None
    # "module:function(spec, source, folder) -> (model, transform)" for models that are not one timm module and one
    # file (ViLT: a transformers folder and its processor). None: timm's path in models.loading.
    loader: str | None = None
    # A transformers repository on the Hugging Face hub holding the released folder.
    hf_repo: str | None = None
    # The released file's name without suffix, where it is not the registry name (METER's .ckpt).
    file_stem: str | None = None
    weights_layout: str = FILE
    inputs: str = IMAGE_INPUTS
    task: str = IMAGE_CLASSIFICATION
    input_size: int = 224
    # Other input sizes a user may pick (the first is ``input_size``, the default); ``sized`` makes the entry at one.
    input_sizes: tuple[int, ...] = ()
    # The keep ratio a released token-pruning model was trained for (pages and CLIs default to it).
    trained_keep_ratio: float | None = None
    # Folders it reads beside its weights in the weights folder, each as (folder name, the Hugging Face repository
    # and files that fill it): METER's roberta-base tokenizer. Home and every missing-weights message name them.
    companion_folders: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    @property
    def attention(self) -> str | None:
        """The attention kind the head-redundancy recording walks: MHSA, CGA, or None (no such attention)."""
        # LV-ViT has multi-head self-attention too, but its output adds an auxiliary token head that the
        # recording walk does not reproduce, so it is not offered where attention is recorded.
        return {MHSA: MHSA, DYNAMICVIT: MHSA, CGA: CGA}.get(self.family)

    @property
    def backbone_family(self) -> str | None:
        """For a token-pruning release, the family of the backbone it prunes (DynamicViT-DeiT: MHSA)."""
        return BACKBONE_FAMILIES.get(self.family)

    @property
    def family_label(self) -> str:
        return FAMILY_LABELS.get(self.family, self.family)

    @property
    def pretrained_name(self) -> str | None:
        if self.timm_id and self.pretrained_tag:
            return f"{self.timm_id}.{self.pretrained_tag}"
        return None

    @property
    def weight_file_stem(self) -> str:
        """File name without suffix (or, for a folder layout, the folder name) looked up in the weights folder."""
        if self.weights_layout == FOLDER and self.hf_repo:
            return self.hf_repo.rsplit("/", 1)[-1]
        return self.file_stem or self.name


_EVIT_REF = "EfficientViT (CVPR 2023) model zoo, V100"
_DEIT_REF = "DeiT (ICML 2021) Table 1, V100"

REGISTRY: dict[str, ModelSpec] = {}


def import_target(target: str):
    """The function a ``"module:function"`` string names (the form of factories, loaders and forwards here)."""
    module_name, function_name = target.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def register(spec: ModelSpec) -> ModelSpec:
    REGISTRY[spec.name] = spec
    return spec


for _name, _top1, _img_s in [
    ("deit_tiny_patch16_224", 72.2, 2536.0),
    ("deit_small_patch16_224", 79.8, 940.0),
    ("deit_base_patch16_224", 81.8, 292.0),
]:
    register(ModelSpec(_name, MHSA, _name, "fb_in1k", top1=_top1, paper_img_s=_img_s, reference=_DEIT_REF))

for _i, (_top1, _img_s) in enumerate([(63.2, 27644), (68.4, 20093), (70.8, 18218),
                                      (73.4, 16644), (74.3, 15914), (77.1, 10621)]):
    register(ModelSpec(f"efficientvit_m{_i}", CGA, f"efficientvit_m{_i}", "r224_in1k",
                       top1=_top1, paper_img_s=float(_img_s), reference=_EVIT_REF))

register(ModelSpec("mobilenetv3_large_100", CNN, "mobilenetv3_large_100", "ra_in1k", top1=75.2,
                   paper_img_s=7560.0, reference="EfficientViT (CVPR 2023) Table 2, V100"))
# MobileViT: convolutions with transformer blocks inside (EfficientViT's ONNX comparison: M2 vs MobileViT-XXS).
register(ModelSpec("mobilevit_xxs", CNN, "mobilevit_xxs", "cvnets_in1k", top1=69.0,
                   reference="MobileViT (ICLR 2022); EfficientViT (CVPR 2023) Table 2"))


# The plain backbones of DynamicCNN and DynamicSwin (timm, ImageNet-1k weights); top-1 from their papers.
for _name, _family, _tag, _top1 in [
    ("convnext_tiny", CNN, "fb_in1k", 82.1), ("convnext_small", CNN, "fb_in1k", 83.1),
    ("convnext_base", CNN, "fb_in1k", 83.8),
    ("swin_tiny_patch4_window7_224", SWIN, "ms_in1k", 81.2), ("swin_small_patch4_window7_224", SWIN, "ms_in1k", 83.2),
    ("swin_base_patch4_window7_224", SWIN, "ms_in1k", 83.5),
]:
    register(ModelSpec(_name, _family, _name, _tag, top1=_top1,
                       reference="ConvNeXt (CVPR 2022)" if _family == CNN else "Swin Transformer (ICCV 2021)"))


# DynamicViT's official releases (rho = 0.7), direct downloads; shapes in models.dynamicvit.DYNAMICVIT_ARCHS.
_DYNAMICVIT_REF = "DynamicViT (NeurIPS 2021), rho = 0.7"
for _name, _top1, _url in [
    ("dynamicvit_deit_256_patch16_224", 76.53, "https://cloud.tsinghua.edu.cn/f/b0e1ff6af1004039855e/?dl=1"),
    ("dynamicvit_deit_small_patch16_224", 79.32, "https://cloud.tsinghua.edu.cn/f/698896dfbcea430b9591/?dl=1"),
    ("dynamicvit_deit_base_patch16_224", 81.43, "https://cloud.tsinghua.edu.cn/f/660f27ddb6b945a797a8/?dl=1"),
]:
    register(ModelSpec(_name, DYNAMICVIT, top1=_top1, reference=_DYNAMICVIT_REF,
                       factory="models.dynamicvit:build_dynamicvit", factory_kwargs={"arch": _name},
                       url=_url, load_fn="models.dynamicvit:load_official_checkpoint", trained_keep_ratio=0.7))


# The zoo's official releases (DynamicViT README). A release is trained for one keep ratio rho: the plain name
# is the rho = 0.7 file, `_rho05` / `_rho09` the others; run each at its own rho (`NAME@rho=0.9`).
_TSINGHUA = "https://cloud.tsinghua.edu.cn/f/{}/?dl=1"
_ZOO_REF = "DynamicViT model zoo (README), trained at rho = {}"
for _name, _family, _factory, _loader, _arch, _rho, _file, _top1 in [
    ("dynamicvit_lvvit_s_rho05", DYNAMIC_LVVIT, "dynamic_lvvit:build_dynamic_lvvit", "dynamic_lvvit:load_official_lvvit",
     "lvvit_s", 0.5, "635cb172312749e39cf2", 81.97),
    ("dynamicvit_lvvit_s", DYNAMIC_LVVIT, "dynamic_lvvit:build_dynamic_lvvit", "dynamic_lvvit:load_official_lvvit",
     "lvvit_s", 0.7, "d732a3511dd64db598e1", 83.08),
    ("dynamicvit_lvvit_m", DYNAMIC_LVVIT, "dynamic_lvvit:build_dynamic_lvvit", "dynamic_lvvit:load_official_lvvit",
     "lvvit_m", 0.7, "b8d1efdfc41d4777903e", 83.82),
    ("dynamiccnn_convnext_tiny", DYNAMIC_CNN, "dynamic_convnext:build_dynamic_convnext",
     "dynamic_convnext:load_official_convnext", "convnext_tiny", 0.7, "95b2daf7593a42f48baa", 81.59),
    ("dynamiccnn_convnext_tiny_rho09", DYNAMIC_CNN, "dynamic_convnext:build_dynamic_convnext",
     "dynamic_convnext:load_official_convnext", "convnext_tiny", 0.9, "030c6b8268104c16a666", 82.06),
    ("dynamiccnn_convnext_small", DYNAMIC_CNN, "dynamic_convnext:build_dynamic_convnext",
     "dynamic_convnext:load_official_convnext", "convnext_small", 0.7, "293972cc7d8c4adaac23", 82.57),
    ("dynamiccnn_convnext_small_rho09", DYNAMIC_CNN, "dynamic_convnext:build_dynamic_convnext",
     "dynamic_convnext:load_official_convnext", "convnext_small", 0.9, "64c4ed5ab02d45998bf6", 83.12),
    ("dynamiccnn_convnext_base", DYNAMIC_CNN, "dynamic_convnext:build_dynamic_convnext",
     "dynamic_convnext:load_official_convnext", "convnext_base", 0.7, "1e3a861f272142c38bbc", 83.45),
    ("dynamiccnn_convnext_base_rho09", DYNAMIC_CNN, "dynamic_convnext:build_dynamic_convnext",
     "dynamic_convnext:load_official_convnext", "convnext_base", 0.9, "9b4c8df7b30d410bba75", 83.96),
    ("dynamicswin_tiny", DYNAMIC_SWIN, "dynamic_swin:build_dynamic_swin", "dynamic_swin:load_official_swin",
     "swin_tiny_patch4_window7_224", 0.7, "6a3d0de592f04d77a2fa", 80.91),
    ("dynamicswin_small", DYNAMIC_SWIN, "dynamic_swin:build_dynamic_swin", "dynamic_swin:load_official_swin",
     "swin_small_patch4_window7_224", 0.7, "86b58132f354495590d0", 83.21),
    ("dynamicswin_base", DYNAMIC_SWIN, "dynamic_swin:build_dynamic_swin", "dynamic_swin:load_official_swin",
     "swin_base_patch4_window7_224", 0.7, "ea260248adc040929970", 83.43),
]:
    register(ModelSpec(_name, _family, top1=_top1, reference=_ZOO_REF.format(_rho),
                       factory=f"models.{_factory}", factory_kwargs={"arch": _arch}, url=_TSINGHUA.format(_file),
                       load_fn=f"models.{_loader}", trained_keep_ratio=_rho))


# ViLT is a transformers model released as a save_pretrained folder with its processor. Its processor resizes the
# shorter side to 384 px; ViLT interpolates its position embeddings to any patch grid (``visual_embed``), so the
# smaller sizes (PuMer's "smaller input resolution" baseline) need no other weights.
VILT_IMAGE_SIZES = (384, 320, 288, 256)
register(ModelSpec("vilt_b32_vqa", VILT, reference="ViLT (ICML 2021), VQAv2 fine-tuned; PuMer (ACL 2023)",
                   factory="models.vilt_pumer:vilt_b32_random", loader="models.vilt_pumer:vilt_from_source",
                   hf_repo="dandelin/vilt-b32-finetuned-vqa", weights_layout=FOLDER, inputs=VQA_INPUTS,
                   task=VISUAL_QUESTION_ANSWERING, input_size=384, input_sizes=VILT_IMAGE_SIZES))

# METER's VQAv2 checkpoint was fine-tuned and evaluated at 576 px (METER's README and config.py, PuMer's checkpoint
# conversion); 288 in its name is the pre-training size; PuMer's own fine-tuning and benchmarks used 384; 320 is
# PuMer's smaller-resolution baseline (the paper: 0.2 % more accurate than PuMer, 20 % slower).
METER_IMAGE_SIZES = (576, 384, 320, 288)
METER_SIZE_NOTES = {576: "the checkpoint's fine-tuned size", 384: "PuMer's own fine-tuning and benchmarks",
                    320: "PuMer's smaller-resolution baseline", 288: "METER's pre-training size"}

# METER is assembled from transformers parts; models.meter reads the official Lightning .ckpt (GitHub release)
# and the roberta-base tokenizer files.
register(ModelSpec("meter_clip16_288_vqa", METER,
                   reference="METER (CVPR 2022) CLIP-ViT-B/16 + RoBERTa, VQAv2 fine-tuned; PuMer (ACL 2023)",
                   factory="models.meter:meter_random", load_fn="models.meter:load_official_file",
                   loader="models.meter:meter_from_source", file_stem="meter_clip16_288_roberta_vqa",
                   url="https://github.com/zdou0830/METER/releases/download/checkpoint/meter_clip16_288_roberta_vqa.ckpt",
                   inputs=VQA_INPUTS, task=VISUAL_QUESTION_ANSWERING, input_size=576, input_sizes=METER_IMAGE_SIZES,
                   companion_folders=(("roberta-base", "FacebookAI/roberta-base", ("vocab.json", "merges.txt")),)))


def sized(spec: ModelSpec, size: int | None) -> ModelSpec:
    """``spec`` at input ``size`` (one of its ``input_sizes``); None or its own size: ``spec`` itself."""
    if size is None or size == spec.input_size:
        return spec
    if size not in spec.input_sizes:
        offered = ", ".join(map(str, spec.input_sizes or (spec.input_size,)))
        raise ValueError(f"{spec.name} runs at {offered} px, not {size} px.")
    return replace(spec, input_size=size)


class UnknownModelError(KeyError):
    """Neither the registry nor timm knows the name. ``str()`` is the message itself (KeyError would quote it);
    ``reason`` is its one sentence about timm ("timm has no model 'x'; names look like ...")."""

    reason = ""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MethodNotApplicable(ValueError):
    """An analysis or method does not apply to this model (no class token, no classification head, a block the
    explicit forwards do not walk, ...). The message says so in one sentence; pages show it, not a traceback."""


def get_spec(name: str) -> ModelSpec:
    """The registry entry ``name``, else a spec inferred from timm for any timm model name (``arch`` or
    ``arch.tag``, e.g. ``vit_base_patch16_224.augreg_in21k_ft_in1k``): see :func:`timm_spec`."""
    spec = REGISTRY.get(name)
    return spec if spec is not None else timm_spec(name)


# The families of the timm classes models.timm_specs recognises.
_TIMM_KIND_FAMILIES = {"vit": MHSA, "efficientvit_msra": CGA, "swin": SWIN, "cnn": CNN}


@functools.lru_cache(maxsize=128)
def timm_spec(name: str) -> ModelSpec:
    """A spec for a timm model the registry does not list, inferred from its class (built on the meta device,
    nothing downloaded): family and attention kind from the class, ``timm_id``/``pretrained_tag`` from the name
    (or timm's default tag), input size from its config. UnknownModelError when timm does not know the name,
    MethodNotApplicable when its class is none the app runs."""
    from . import timm_specs

    try:
        arch = timm_specs.describe(name)
    except timm_specs.NoSuchTimmModel as exc:
        known = ", ".join(sorted(REGISTRY))
        error = UnknownModelError(f"Unknown model {name!r}: {exc} Registry models: {known}")
        error.reason = str(exc)  # the one sentence about timm, for a page
        raise error from None
    except timm_specs.UnsupportedTimmClass as exc:
        raise MethodNotApplicable(str(exc)) from None
    return ModelSpec(name, _TIMM_KIND_FAMILIES[arch.kind], arch.architecture, arch.tag,
                     reference=f"timm {arch.class_name} (not in the registry: inferred from its class)",
                     task=IMAGE_CLASSIFICATION if arch.num_classes else IMAGE_FEATURES, input_size=arch.input_size)


def list_models(family: str | None = None, task: str | None = None) -> list[str]:
    return [n for n, s in REGISTRY.items()
            if (family is None or s.family == family) and (task is None or s.task == task)]


def models_with_attention(*kinds: str) -> list[str]:
    """Registry names whose attention kind (``ModelSpec.attention``) is one of ``kinds``, in registry order."""
    return [n for n, s in REGISTRY.items() if s.attention in kinds]

