"""PuMer's baselines on ViLT and METER (ToMe, EViT, a target FLOP ratio) and the input size as a variant, on the tiny
random models: exact at the neutral setting, image tokens only, FLOP targets met, sizes loaded and fed."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from models import meter as meter_module
from models import vilt_pumer
from models.meter import MeterForQuestionAnswering, tiny_meter
from models.meter_baselines import meter_evit_forward, meter_tome_forward
from models.methods import METHODS, methods_for
from models.registry import get_spec
from models.vilt_baselines import evit_keep_for_flops, tome_r_for_flops, vilt_evit_forward, vilt_tome_forward

VILT, METER = "vilt_b32_vqa", "meter_clip16_288_vqa"


@pytest.fixture(scope="module")
def vilt():
    return tiny_vilt_model()


def tiny_vilt_model():
    return vilt_pumer.tiny_vilt(seed=0)


@pytest.fixture(scope="module")
def meter():
    return tiny_meter(seed=0)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)) for shape in ((160, 160, 3), (120, 200, 3))]


def _batch(processor, photos):
    """Two questions of different lengths about two images of different shapes: padded text and (ViLT) pixels."""
    return processor(images=photos, text=["what is the color of the dog?", "how many"], return_tensors="pt",
                     padding=True)


def test_neutral_settings_equal_the_model_forward(vilt, meter, photos):
    for (model, processor), family in ((vilt, "vilt"), (meter, "meter")):
        inputs = _batch(processor, photos)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.inference_mode():
            expected = model(**inputs)
            expected = getattr(expected, "logits", expected)
            for key in (f"tome-{family}", f"evit-{family}"):
                got = METHODS[key].bind_neutral(model)(inputs)
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=key)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_reduction_takes_image_tokens_only(vilt, meter, photos):
    model, processor = vilt
    inputs = _batch(processor, photos)
    with torch.inference_mode():
        plain = model(**inputs).logits
        for forward, settings in ((vilt_tome_forward, dict(r=3)), (vilt_evit_forward, dict(keep_rate=0.5))):
            logits, trace = forward(model, inputs, return_trace=True, **settings)
            assert (trace.text_counts == trace.text_counts[:, :1]).all()  # every text token, every layer
            assert (trace.text_counts[:, 0] == inputs["attention_mask"].sum(dim=1).numpy()).all()
            assert (np.diff(trace.image_counts, axis=1) <= 0).all() and (trace.image_counts[:, -1] < trace.image_counts[:, 0]).all()
            assert not torch.allclose(logits, plain)
    _, trace = vilt_tome_forward(model, inputs, r=3, return_trace=True)
    assert trace.image_counts[1, :4].tolist() == [41, 38, 35, 32]  # 40 patches + the image CLS, 3 merged per layer

    model, processor = meter
    inputs = _batch(processor, photos)
    with torch.inference_mode():
        _, tome = meter_tome_forward(model, inputs, r=3, return_trace=True)
        _, evit = meter_evit_forward(model, inputs, keep_rate=0.5, return_trace=True)
    assert tome.image_counts[0].tolist() == [17, 14, 11]  # 16 patches + CLS through 2 tower blocks
    assert evit.image_counts[0].tolist() == [17, 17, 10]  # block 1: CLS + 8 kept + 1 fused
    assert (tome.text_counts == inputs["attention_mask"].sum(dim=1, keepdim=True).numpy()).all()


def _reference_inputs(side: int, vocab: int) -> dict:
    """The FLOP target's reference: an 11-token question about a square image."""
    ids = torch.randint(5, vocab, (1, 11), generator=torch.Generator().manual_seed(0))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids),
                pixel_values=torch.randn(1, 3, side, side), pixel_mask=torch.ones(1, side, side, dtype=torch.long))


def test_a_flop_target_picks_the_closest_setting(vilt, meter):
    """The FLOPs the counter counts over the real forward at the picked setting are the closest to the target."""
    from analysis.timing.flops import measure_flops

    def counted(forward, model, inputs, **settings):
        with torch.inference_mode():
            return measure_flops(lambda: forward(model, inputs, **settings))[1]

    model = vilt[0]
    inputs = _reference_inputs(160, 60)
    full = counted(vilt_tome_forward, model, inputs, r=0)
    r = tome_r_for_flops(model, 160, 0.75)
    ratios = {v: counted(vilt_tome_forward, model, inputs, r=v) / full for v in (r - 1, r, r + 1)}
    assert abs(ratios[r] - 0.75) == min(abs(v - 0.75) for v in ratios.values()) and abs(ratios[r] - 0.75) < 0.05
    assert counted(vilt_tome_forward, model, inputs, flop_ratio=0.75) == counted(vilt_tome_forward, model, inputs, r=r)
    keep = evit_keep_for_flops(model, 160, 0.85)
    assert abs(counted(vilt_evit_forward, model, inputs, keep_rate=keep) / full - 0.85) < 0.03

    model = meter[0]
    inputs = _reference_inputs(64, len(meter[1].tokenizer))
    full = counted(meter_tome_forward, model, inputs, r=0)
    assert abs(counted(meter_tome_forward, model, inputs, flop_ratio=0.8) / full - 0.8) < 0.05
    with pytest.raises(ValueError, match="not both"):
        meter_tome_forward(model, inputs, r=2, flop_ratio=0.8)


@pytest.fixture
def tiny_registry_models(monkeypatch):
    """The registry's random ViLT and METER built at tiny widths (the full ones take seconds to build)."""
    config = tiny_meter(0)[0].config
    monkeypatch.setattr(vilt_pumer, "vilt_b32_random", lambda: tiny_vilt_model()[0])
    monkeypatch.setattr(meter_module, "meter_random", lambda image_size=576: MeterForQuestionAnswering(
        dataclasses.replace(config, image_size=image_size)).eval())


def test_a_size_variant_loads_and_feeds_that_size(tiny_registry_models):
    from analysis.timing.runners import make_runner

    for text, side, patch, method in ((f"{VILT}@size=320", 320, 32, "sized_forward"),
                                      (f"{VILT}@pumer,size=256", 256, 32, "pumer_forward"),
                                      (f"{METER}@pumer,size=384", 384, 16, "meter_pumer_forward")):
        runner = make_runner(text, random_weights=True)
        inputs = runner.make_inputs(1)
        assert inputs["pixel_values"].shape[-2:] == (side, side) and runner.forward.func.__name__ == method
        model = runner.forward.args[0]
        pumer = METHODS["pumer" if "vilt" in text else "pumer-meter"]
        settings = runner.forward.keywords if method != "sized_forward" else pumer.neutral_arguments
        with torch.inference_mode():
            runner.forward(inputs)
            _, trace = pumer.forward_function()(model, inputs, **settings, return_trace=True)
        assert trace.image_counts[0, 0] == 1 + (side // patch) ** 2  # the image CLS and every patch at that size
    with pytest.raises(ValueError, match="576, 384, 320, 288 px, not 500 px"):
        make_runner(f"{METER}@size=500", random_weights=True)


def test_the_method_table_offers_the_baselines_and_sizes():
    from models.variants import parse_variant, variant_groups

    for name, family in ((VILT, "vilt"), (METER, "meter")):
        keys = {m.key for m in methods_for(get_spec(name))}
        assert {f"tome-{family}", f"tome-flops-{family}", f"evit-{family}", f"evit-flops-{family}",
                f"size-{family}"} <= keys
        assert "DynamicViT is not offered" in METHODS[f"evit-{family}"].main_setting.help
    assert parse_variant(f"{METER}@pumer,size=320").input_size == 320
    groups = {g.key: g for g in variant_groups([VILT, METER])}
    sizes = groups["Input size_size"]
    assert 256 in sizes.options and 576 in sizes.options
    assert sizes.variants([320, 256]) == [f"{VILT}@size=320", f"{VILT}@size=256", f"{METER}@size=320"]
    assert groups["ToMe_tome_flops"].variants([0.6]) == [f"{VILT}@tome_flops=0.6", f"{METER}@tome_flops=0.6"]
