import pytest
import torch

from models.loading import build_random, load_model
from models.registry import (CGA, CNN, DYNAMIC_CNN, DYNAMIC_LVVIT, DYNAMIC_SWIN, DYNAMICVIT, METER, MHSA, REGISTRY,
                             VILT, get_spec, list_models)

REQUIRED = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
            *[f"efficientvit_m{i}" for i in range(6)], "mobilenetv3_large_100"]
TINY = {"deit_tiny_patch16_224", "efficientvit_m0", "mobilenetv3_large_100"}
FACTORY_CLASSES = {DYNAMICVIT: "DynamicViT", DYNAMIC_LVVIT: "DynamicLVViT", DYNAMIC_CNN: "DynamicConvNeXt",
                   DYNAMIC_SWIN: "DynamicSwin", VILT: "ViltForQuestionAnswering", METER: "MeterForQuestionAnswering"}


def test_required_entries_with_family_and_pretrained_tag():
    for name in REQUIRED:
        spec = get_spec(name)
        assert spec.family in (MHSA, CGA, CNN)
        assert spec.timm_id and spec.pretrained_tag, name
    assert set(list_models(CGA)) >= {f"efficientvit_m{i}" for i in range(6)}


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="deit_tiny_patch16_224"):
        get_spec("deit_huge")


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_entry_builds_with_random_weights(name):
    spec = get_spec(name)
    model = build_random(spec)
    params = list(model.parameters())
    assert params and all(torch.isfinite(p).all() for p in params), name
    if spec.timm_id:  # timm's own architecture, under the name the weights resolver looks up
        assert model.pretrained_cfg["architecture"] == spec.timm_id
    else:  # the entry's factory builds its family's class
        assert type(model).__name__ == FACTORY_CLASSES[spec.family], (name, type(model).__name__)
    if name in TINY:
        loaded = load_model(name, random_weights=True)
        assert loaded.weights.is_random and "RANDOM" in loaded.weights.description
        size = loaded.data_config["input_size"]
        with torch.inference_mode():
            logits = loaded.model(torch.randn(2, *size))
        assert logits.shape == (2, 1000) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "efficientvit_m0", "dynamicswin_tiny",
                                  "dynamiccnn_convnext_tiny", "vilt_b32_vqa"])
def test_meta_builds_skip_the_initialisers_and_keep_every_shape(name):
    """``on_meta`` (the method checks, checkpoint matching, typed timm names) builds the same architecture as
    ``torch.device("meta")``: every parameter and buffer with its shape and dtype, the same modules."""
    from models.device import on_meta

    spec = get_spec(name)
    with torch.device("meta"):
        initialised = build_random(spec)
    with on_meta():
        skipped = build_random(spec)
    assert repr(skipped) == repr(initialised)
    for mine, theirs in ((skipped.state_dict(), initialised.state_dict()),
                         (dict(skipped.named_buffers()), dict(initialised.named_buffers()))):
        assert {k: (v.shape, v.dtype, v.device) for k, v in mine.items()} == {
            k: (v.shape, v.dtype, v.device) for k, v in theirs.items()}
    with on_meta():
        real = torch.ones(2, device="cpu").mul_(3)  # a tensor with values still gets them
    assert real.tolist() == [3.0, 3.0]


def test_every_method_forward_exists_and_applies_to_some_model():
    from models.methods import METHODS, methods_for

    for method in METHODS.values():
        assert callable(method.forward_function()), method.key
        assert any(method.applies_to(spec) for spec in REGISTRY.values()), method.key
        assert method.main_setting.default in method.main_setting.choices
    assert [m.key for m in methods_for(get_spec("deit_small_patch16_224"))] == ["tome", "evit"]
    assert methods_for(get_spec("efficientvit_m0")) == []


def test_method_settings_become_forward_arguments():
    from models.methods import METHODS, method_of

    assert method_of({"rho": 0.7}) is METHODS["dynamicvit"]
    assert METHODS["dynamicvit"].arguments({"rho": "0.5"}) == {"keep_ratio": 0.5}
    assert METHODS["tome"].arguments({"tome": "decreasing:13", "prop_attn": False}) == \
        {"r": "decreasing:13", "proportional_attention": False}
    assert METHODS["pumer"].arguments({"pumer": True, "prune": 0.2}) == \
        {"prune_ratio": 0.2, "image_merge_ratio": 0.3, "text_merge_ratio": 0.2}
    with pytest.raises(ValueError, match="match no method"):
        method_of({"speed": 11})


def test_a_method_at_its_neutral_arguments_equals_the_model():
    from models.methods import METHODS

    loaded = load_model("deit_tiny_patch16_224", random_weights=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(METHODS["tome"].bind_neutral(loaded.model)(x), loaded.model(x), atol=1e-5, rtol=1e-5)
