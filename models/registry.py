"""Named models: family, attention kind, where the weights live and published reference figures.

The lowest module of the package: it imports nothing of the project, so everything else may import it.
Token-reduction methods are not models: ``models.methods`` says which method applies to which family.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Families: which token-reduction methods apply (models.methods) and how a model is built and fed.
# MHSA and CGA double as the attention kinds that the recording forwards and the analyses dispatch on.
MHSA = "mhsa"
CGA = "cga"
CNN = "cnn"
DYNAMICVIT = "dynamicvit"
VILT = "vilt"
METER = "meter"

FAMILY_LABELS = {
    MHSA: "ViT / DeiT (multi-head self-attention)",
    CGA: "EfficientViT (cascaded group attention)",
    CNN: "CNN",
    DYNAMICVIT: "DynamicViT (DeiT + score predictors)",
    VILT: "ViLT (vision-language)",
    METER: "METER (vision-language)",
}

# What a model's forward takes; the throughput harness builds inputs of this kind.
IMAGE_INPUTS = "image"
VQA_INPUTS = "image+question"

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
    # "module:function(spec, source) -> (model, transform)" for models that are not one timm module and one
    # file (ViLT: a transformers folder and its processor). None: timm's path in models.loading.
    loader: str | None = None
    # A transformers repository on the Hugging Face hub holding the released folder.
    hf_repo: str | None = None
    # The released file's name without suffix, where it is not the registry name (METER's .ckpt).
    file_stem: str | None = None
    weights_layout: str = FILE
    inputs: str = IMAGE_INPUTS
    input_size: int = 224

    @property
    def attention(self) -> str | None:
        """The attention kind the head-redundancy recording walks: MHSA, CGA, or None (no such attention)."""
        return {MHSA: MHSA, DYNAMICVIT: MHSA, CGA: CGA}.get(self.family)

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


# DynamicViT's official releases (rho = 0.7), direct downloads; shapes in models.dynamicvit.DYNAMICVIT_ARCHS.
_DYNAMICVIT_REF = "DynamicViT (NeurIPS 2021), rho = 0.7"
for _name, _top1, _url in [
    ("dynamicvit_deit_256_patch16_224", 76.53, "https://cloud.tsinghua.edu.cn/f/b0e1ff6af1004039855e/?dl=1"),
    ("dynamicvit_deit_small_patch16_224", 79.32, "https://cloud.tsinghua.edu.cn/f/698896dfbcea430b9591/?dl=1"),
    ("dynamicvit_deit_base_patch16_224", 81.43, "https://cloud.tsinghua.edu.cn/f/660f27ddb6b945a797a8/?dl=1"),
]:
    register(ModelSpec(_name, DYNAMICVIT, top1=_top1, reference=_DYNAMICVIT_REF,
                       factory="models.dynamicvit:build_dynamicvit", factory_kwargs={"arch": _name},
                       url=_url, load_fn="models.dynamicvit:load_official_checkpoint"))


# ViLT is a transformers model released as a save_pretrained folder with its processor.
register(ModelSpec("vilt_b32_vqa", VILT, reference="ViLT (ICML 2021), VQAv2 fine-tuned; PuMer (ACL 2023)",
                   factory="models.vilt_pumer:vilt_b32_random", loader="models.vilt_pumer:vilt_from_source",
                   hf_repo="dandelin/vilt-b32-finetuned-vqa", weights_layout=FOLDER, inputs=VQA_INPUTS,
                   input_size=384))

# METER is assembled from transformers parts; models.meter reads the official Lightning .ckpt (GitHub release)
# and the roberta-base tokenizer files.
register(ModelSpec("meter_clip16_288_vqa", METER,
                   reference="METER (CVPR 2022) CLIP-ViT-B/16 + RoBERTa, VQAv2 fine-tuned; PuMer (ACL 2023)",
                   factory="models.meter:meter_random", load_fn="models.meter:load_official_file",
                   loader="models.meter:meter_from_source", file_stem="meter_clip16_288_roberta_vqa",
                   url="https://github.com/zdou0830/METER/releases/download/checkpoint/meter_clip16_288_roberta_vqa.ckpt",
                   inputs=VQA_INPUTS, input_size=288))


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise KeyError(f"Unknown model {name!r}. Known models: {known}") from None


def list_models(family: str | None = None) -> list[str]:
    return [n for n, s in REGISTRY.items() if family is None or s.family == family]

