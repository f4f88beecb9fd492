import pytest
import torch

from models.loading import build_random, load_model
from models.registry import CGA, CNN, MHSA, REGISTRY, get_spec, list_models

REQUIRED = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
            *[f"efficientvit_m{i}" for i in range(6)], "mobilenetv3_large_100"]
TINY = {"deit_tiny_patch16_224", "efficientvit_m0", "mobilenetv3_large_100"}


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
    model = build_random(get_spec(name))
    assert sum(p.numel() for p in model.parameters()) > 0
    if name in TINY:
        loaded = load_model(name, random_weights=True)
        assert loaded.weights.is_random and "RANDOM" in loaded.weights.description
        size = loaded.data_config["input_size"]
        with torch.inference_mode():
            logits = loaded.model(torch.randn(2, *size))
        assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
