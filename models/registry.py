"""Named models: family, timm id, pretrained tag and published reference figures.

Token-reduction methods (DynamicViT, ToMe, PuMer) add entries or forward settings on top of these;
see ``models.variants`` for how the throughput CLI names them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MHSA = "MHSA ViT"
CGA = "cascaded group attention"
CNN = "CNN"
DYNAMICVIT = "DynamicViT"
VILT = "ViLT"
METER = "METER"


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
    input_size: int = 224

    @property
    def pretrained_name(self) -> str | None:
        if self.timm_id and self.pretrained_tag:
            return f"{self.timm_id}.{self.pretrained_tag}"
        return None

    @property
    def weight_file_stem(self) -> str:
        """File name (without suffix) looked up in the weights folder."""
        return self.name


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


_DYNAMICVIT_REF = "DynamicViT (NeurIPS 2021), rho = 0.7"
for _name, _top1 in [("dynamicvit_deit_256_patch16_224", 76.53), ("dynamicvit_deit_small_patch16_224", 79.32),
                     ("dynamicvit_deit_base_patch16_224", 81.43)]:
    from .dynamicvit import DYNAMICVIT_ARCHS as _ARCHS  # noqa: E402 - kept next to its only use

    register(ModelSpec(_name, DYNAMICVIT, top1=_top1, reference=_DYNAMICVIT_REF,
                       factory="models.dynamicvit:build_dynamicvit", factory_kwargs={"arch": _name},
                       url=_ARCHS[_name].url, load_fn="models.dynamicvit:load_official_checkpoint"))


# ViLT is a transformers model (a save_pretrained folder, not one file); models.vilt_pumer loads it.
register(ModelSpec("vilt_b32_vqa", VILT, reference="ViLT (ICML 2021), VQAv2 fine-tuned; PuMer (ACL 2023)",
                   factory="models.vilt_pumer:vilt_b32_random", input_size=384))

# METER is assembled from transformers parts; models.meter loads the official Lightning .ckpt (GitHub release).
register(ModelSpec("meter_clip16_288_vqa", METER,
                   reference="METER (CVPR 2022) CLIP-ViT-B/16 + RoBERTa, VQAv2 fine-tuned; PuMer (ACL 2023)",
                   factory="models.meter:meter_random", load_fn="models.meter:load_official_file", input_size=288,
                   url="https://github.com/zdou0830/METER/releases/download/checkpoint/meter_clip16_288_roberta_vqa.ckpt"))


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise KeyError(f"Unknown model {name!r}. Known models: {known}") from None


def list_models(family: str | None = None) -> list[str]:
    return [n for n, s in REGISTRY.items() if family is None or s.family == family]
