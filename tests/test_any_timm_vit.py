"""Any timm model by name (#24 item 2): small ViTs the registry does not list, registered with timm here, run through
every analysis: a class-token ViT, one with 4 registers, one without a class token (global average pooling).

Random weights, 64 px, no network and nothing from ../shared.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, _cfg, _create_vision_transformer

from models.registry import CNN, IMAGE_CLASSIFICATION, IMAGE_FEATURES, MHSA, MethodNotApplicable, SWIN, get_spec

TINY = dict(img_size=64, patch_size=16, embed_dim=48, depth=4, num_heads=3, num_classes=1000)
CLS, REG4, GAP = "anyvit_tiny_cls_test", "anyvit_tiny_reg4_test", "anyvit_tiny_gap_test"
NAMES = (CLS, REG4, GAP)
PREFIX = {CLS: 1, REG4: 5, GAP: 0}

# timm reads a module's ``default_cfgs`` when ``register_model`` runs: each test model gets a 64 px config.
default_cfgs = generate_default_cfgs({f"{name}.untrained": _cfg(input_size=(3, 64, 64), num_classes=1000)
                                      for name in NAMES})


@register_model
def anyvit_tiny_cls_test(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create_vision_transformer(CLS, pretrained=pretrained, **dict(TINY, **kwargs))


@register_model
def anyvit_tiny_reg4_test(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create_vision_transformer(REG4, pretrained=pretrained, **dict(TINY, reg_tokens=4, **kwargs))


@register_model
def anyvit_tiny_gap_test(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create_vision_transformer(GAP, pretrained=pretrained,
                                      **dict(TINY, class_token=False, global_pool="avg", **kwargs))


@register_model
def anyvit_tiny_bare_test(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Built directly, without timm's config machinery: no pretrained config, no tag."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return VisionTransformer(**dict(TINY, **kwargs))


def test_a_bare_model_function_without_a_config_is_sized_by_its_patch_grid(tmp_path):
    from models import weights as W
    from models.checkpoints import WeightsNotFoundError
    from models.loading import load_model

    spec = get_spec("anyvit_tiny_bare_test")
    assert (spec.family, spec.pretrained_tag, spec.pretrained_name, spec.input_size) == (MHSA, None, None, 64)
    model = load_model("anyvit_tiny_bare_test", random_weights=True)
    assert model.data_config["input_size"] == (3, 64, 64)
    with pytest.raises(WeightsNotFoundError, match="Put anyvit_tiny_bare_test.safetensors"):
        W.resolve(spec, folder=tmp_path, allow_network=False)


@pytest.fixture(scope="module")
def loaded():
    from models.loading import load_model

    torch.manual_seed(0)
    return {name: load_model(name, random_weights=True) for name in NAMES}


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------- the spec

@pytest.mark.parametrize("name", NAMES)
def test_an_unregistered_timm_vit_gets_a_spec_inferred_from_its_class(name):
    spec = get_spec(name)
    assert (spec.family, spec.attention, spec.timm_id, spec.pretrained_tag) == (MHSA, MHSA, name, "untrained")
    assert spec.input_size == 64 and spec.task == IMAGE_CLASSIFICATION
    assert get_spec(name) is spec  # cached


@pytest.mark.parametrize("name, family, tag, size, task", [
    ("vit_base_patch16_224.augreg_in21k_ft_in1k", MHSA, "augreg_in21k_ft_in1k", 224, IMAGE_CLASSIFICATION),
    ("deit3_small_patch16_224", MHSA, "fb_in1k", 224, IMAGE_CLASSIFICATION),  # timm's default tag
    ("vit_small_patch14_dinov2", MHSA, "lvd142m", 518, IMAGE_FEATURES),      # no head: features only
    ("vit_small_patch14_reg4_dinov2.lvd142m", MHSA, "lvd142m", 518, IMAGE_FEATURES),
    ("swin_tiny_patch4_window7_224.ms_in22k", SWIN, "ms_in22k", 224, IMAGE_CLASSIFICATION),
    ("resnet18.a1_in1k", CNN, "a1_in1k", 224, IMAGE_CLASSIFICATION),
])
def test_timm_names_with_and_without_tags(name, family, tag, size, task):
    spec = get_spec(name)
    assert (spec.family, spec.pretrained_tag, spec.input_size, spec.task) == (family, tag, size, task)
    assert spec.pretrained_name == f"{spec.timm_id}.{tag}"


def test_unknown_names_and_unsupported_classes_say_so_in_one_sentence():
    with pytest.raises(KeyError) as unknown:
        get_spec("vit_tiniest_patch3")
    assert str(unknown.value).startswith("Unknown model 'vit_tiniest_patch3': timm has no model 'vit_tiniest_patch3'; "
                                         "names look like vit_base_patch16_224.augreg_in21k_ft_in1k.")
    with pytest.raises(KeyError, match="no pretrained tag 'nope' for vit_base_patch16_224; its tags: .*augreg_in1k"):
        get_spec("vit_base_patch16_224.nope")
    with pytest.raises(MethodNotApplicable, match="is a timm Eva, which this app does not run"):
        get_spec("eva02_tiny_patch14_224")


# ----------------------------------------------------------------------------------------------- the walks

@pytest.mark.parametrize("name", NAMES)
def test_explicit_forwards_equal_the_model_at_neutral_settings(name, loaded, batch):
    from models.attention_recording import record_attention
    from models.tome import tome_forward

    model = loaded[name].model
    with torch.inference_mode():
        reference = model(batch)
        recorded, record = record_attention(model, batch)
        merged_nothing, trace = tome_forward(model, batch, r=0, return_trace=True)
    assert reference.shape == (2, 1000)
    torch.testing.assert_close(recorded, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged_nothing, reference, atol=1e-5, rtol=0)
    tokens = 16 + PREFIX[name]
    assert [b.maps.shape for b in record.blocks] == [(2, 3, tokens, tokens)] * 4
    assert {b.num_prefix_tokens for b in record.blocks} == {PREFIX[name]}
    assert trace.tokens_per_layer == [tokens] * 4


# ViT variants timm ships: DINOv2 (patch 14, layer scale, registers), DeiT III (layer scale, position embedding
# without the class token), qk-norm, a MAP head without class token, DeiT's distillation token; fused or not.
VARIANTS = {
    "dinov2_reg": dict(img_size=56, patch_size=14, init_values=0.1, reg_tokens=4),
    "deit3": dict(no_embed_class=True, init_values=0.1),
    "qk_norm": dict(qk_norm=True),
    "gap_reg": dict(class_token=False, global_pool="avg", reg_tokens=2),
    "map_head": dict(class_token=False, global_pool="map"),
    "distilled": None,
}


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_walk_equals_the_model_on_vit_variants(variant, fused):
    from timm.models.deit import VisionTransformerDistilled

    from models.attention_recording import record_attention
    from models.tome import tome_forward

    torch.manual_seed(0)
    kwargs = VARIANTS[variant]
    model = (VisionTransformerDistilled(**TINY) if kwargs is None else VisionTransformer(**dict(TINY, **kwargs))).eval()
    for block in model.blocks:  # a model of its own: the non-fused path is timm's explicit softmax
        block.attn.fused_attn = fused
    size = model.patch_embed.img_size[0]
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        reference = model(x)
        recorded, record = record_attention(model, x)
        merged_nothing = tome_forward(model, x, r=0)
        merged, trace = tome_forward(model, x, r=2, return_trace=True)
    torch.testing.assert_close(recorded, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged_nothing, reference, atol=1e-5, rtol=0)
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    assert record.blocks[0].maps.shape[-1] == tokens
    assert trace.tokens_per_layer == [tokens - 2 * (i + 1) for i in range(4)] and merged.shape == reference.shape
    assert (trace.prefix_assignments[-1] == np.arange(model.num_prefix_tokens)).all()


@pytest.mark.parametrize("name", NAMES)
def test_tome_never_merges_the_prefix_tokens(name, loaded, batch):
    """Registers, like the class token, stay out of every pair and in front; the patches lose r tokens per block."""
    from models.tome import tome_forward

    model, prefix = loaded[name].model, PREFIX[name]
    with torch.inference_mode():
        _, trace = tome_forward(model, batch, r=3, return_trace=True)
    assert trace.tokens_per_layer == [16 + prefix - 3 * (i + 1) for i in range(4)]
    for layer in range(4):
        assert (trace.prefix_assignments[layer] == np.arange(prefix)).all()  # each prefix token holds itself
        assert trace.assignments[layer].min() >= prefix                      # no patch went into a prefix token
        assert trace.sizes[layer][:, prefix:].sum(axis=1).tolist() == [16.0, 16.0]
        assert (trace.sizes[layer][:, :prefix] == 1).all()


@pytest.mark.parametrize("name", [CLS, REG4])
def test_merging_in_the_last_block_leaves_the_class_token_logits_alone(name, loaded, batch):
    """The last block merges between its attention and its (per-token) MLP: with the class token kept out of every
    pair and kept first, the logits read from it are exactly the unmerged model's."""
    from models.tome import tome_forward

    model = loaded[name].model
    with torch.inference_mode():
        merged, trace = tome_forward(model, batch, r=[0, 0, 0, 7], return_trace=True)
        reference = model(batch)
    assert trace.tokens_per_layer[-1] == 16 + PREFIX[name] - 7
    torch.testing.assert_close(merged, reference, atol=1e-5, rtol=0)


def test_without_a_class_token_the_pooled_mean_is_weighted_by_token_size(loaded):
    """A merged token holding two patches counts twice in the average pooling, as its two patches did."""
    from models.vit_forward import classify

    model = loaded[GAP].model
    tokens = torch.randn(1, 3, 48, generator=torch.Generator().manual_seed(2))
    duplicated = torch.cat([tokens[:, :1], tokens], dim=1)  # token 0 twice
    with torch.inference_mode():
        weighted = classify(model, tokens, torch.tensor([[[2.0], [1.0], [1.0]]]))
        plain = classify(model, duplicated)
        unit = classify(model, tokens, torch.ones(1, 3, 1))
        timm_pool = model.forward_head(model.norm(tokens))
    torch.testing.assert_close(weighted, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(unit, timm_pool, atol=1e-5, rtol=0)
    assert not torch.allclose(weighted, timm_pool, atol=1e-4)


# ----------------------------------------------------------------------------------------------- every analysis

@pytest.mark.parametrize("name", NAMES)
def test_head_redundancy(name, loaded, batch):
    from analysis.head_redundancy import analyze_model, to_dataframe

    result = analyze_model(loaded[name].model, batch, name, random_weights=True)
    frame = to_dataframe(result)
    assert len(result.blocks) == 4 and len(frame) == 4 * 3
    assert all(b.attention_similarity.shape == b.feature_similarity.shape == (3, 3) for b in result.blocks)
    assert np.isfinite(result.mean_redundancy()).all()
    assert frame["model"].eq(name).all()


@pytest.mark.parametrize("name", NAMES)
def test_taylor_importance(name, loaded, batch):
    from analysis.channel_importance import taylor_importance

    scores = taylor_importance(loaded[name].model, [(batch, None)], model_name=name)
    frame = scores.to_dataframe()
    assert set(frame["component"]) == {"embed", "q", "k", "v", "proj", "ffn_hidden"}
    per_block = frame[frame["component"] == "ffn_hidden"].groupby("block").size()
    assert per_block.tolist() == [4 * 48] * 4  # every block's FFN hidden channels (mlp ratio 4)
    assert len(frame[frame["component"] == "embed"]) == 48
    assert np.isfinite(scores.score).all() and (scores.score > 0).any()
    assert scores.model == name and scores.num_images == 2


@pytest.mark.parametrize("name", NAMES)
def test_token_reduction_comparison_on_the_typed_vit(name, loaded, batch):
    """The token-reduction analysis offers the typed model and runs ToMe on it; EViT, which ranks by the class
    token's attention, is offered and runs where there is one, and says in one sentence where there is none."""
    from analysis.token_reduction import compare_reductions, methods_running_on, model_choices
    from models.methods import METHODS

    spec = get_spec(name)
    assert name in model_choices([name])
    running = {m.key for m in methods_running_on(spec)}
    assert "tome" in running and ("evit" in running) == (name != GAP)  # EViT needs the class token
    tome = METHODS["tome"]
    comparison = compare_reductions(loaded[name].model, batch, ["a", "b"], [tome], {"tome": {"tome": 2}})
    run = comparison.runs["tome"]
    assert run.logits.shape == (2, 1000) and comparison.num_tokens == 16 + PREFIX[name]
    assert run.trace.tokens_per_layer[-1] == 16 + PREFIX[name] - 8 and run.trace.num_prefix_tokens == PREFIX[name]
    evit = METHODS["evit"]
    if name == GAP:
        with pytest.raises(MethodNotApplicable, match="this model has no class token"):
            compare_reductions(loaded[name].model, batch, ["a", "b"], [evit])
    else:
        evit_run = compare_reductions(loaded[name].model, batch, ["a", "b"], [evit]).runs["evit"]
        assert evit_run.logits.shape == (2, 1000)


@pytest.mark.parametrize("name", NAMES)
def test_frontier_points_and_timing(name, loaded, batch):
    from analysis.runs.frontier import FrontierSetting, FrontierTask, measure_throughput
    from analysis.timing.harness import BenchSettings

    settings = [FrontierSetting.parse(t) for t in ["unreduced", "tome=0", "tome=2", "tome=4"]]
    task = FrontierTask(loaded[name].model, name, settings)
    task.update(batch, torch.full((2,), -1))
    record = task.result(task.sums)
    assert record.images == 2 and record.agree[0] == record.agree[1] == 2
    speed = measure_throughput(loaded[name], settings, BenchSettings(batch=2, iters=1, rounds=1, warmup=0))
    assert speed["setting_key"].tolist() == ["unreduced", "tome=0", "tome=2", "tome=4"]
    assert (speed["img_per_s"] > 0).all()
    gflops = speed.set_index("setting_key")["gflops"]
    assert gflops["tome=4"] < gflops["tome=2"] < gflops["unreduced"]


@pytest.mark.parametrize("name", NAMES)
def test_throughput_cli_with_tome(name, capsys, tmp_path):
    from analysis.throughput import cli as T

    out = tmp_path / "r.json"
    code = T.main(["--models", name, f"{name}@tome=2", "--baseline", name, "--random-weights", "--device", "cpu",
                   "--batch", "2", "--iters", "1", "--rounds", "1", "--warmup", "0", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert f"speedup {name}@tome=2 vs {name}: " in printed
    assert f'"{name}@tome=2"' in out.read_text()


def test_breakdown_cli_on_a_register_vit_with_tome(tmp_path, capsys):
    """analysis.breakdown takes the typed name: the sdpa of each block is attention, ToMe's matching is reduction."""
    import json

    from analysis import breakdown as B
    from models.scopes import ATTENTION, REDUCTION

    code = B.main(["--models", REG4, f"{REG4}@tome=2", "--batch", "2", "--iters", "1", "--warmup", "0",
                   "--no-roofline", "--out", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / "breakdown.json").read_text())
    assert [m["model"] for m in data["models"]] == [REG4, f"{REG4}@tome=2"]
    ops = __import__("pandas").read_csv(tmp_path / "ops.csv")
    plain, merged = ops[ops["model"] == REG4], ops[ops["model"] == f"{REG4}@tome=2"]
    assert plain[(plain["op"] == "scaled_dot_product_attention") & (plain["component"] == ATTENTION)]["calls"].sum() == 4
    assert REDUCTION in set(merged["component"]) and REDUCTION not in set(plain["component"])


# ----------------------------------------------------------------------------------------------- pages

def _page(name: str) -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parents[1] / "pages" / f"{name}.py")


@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(tmp_path))


def test_head_redundancy_page_on_a_typed_register_vit(no_weights):
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(_page("head_redundancy"), default_timeout=180)
    app.session_state["hr_models"] = []
    app.session_state["hr_timm"] = f"{REG4} no_such_vit_patch3 resnet18"
    app.session_state["hr_random_models"] = [REG4]
    app.session_state["hr_max_images"] = 1
    app.run()
    assert not app.exception, app.exception
    errors = [e.value for e in app.error]
    assert errors == ["timm has no model 'no_such_vit_patch3'; names look like vit_base_patch16_224.augreg_in21k_ft_in1k.",
                      "resnet18 is a CNN model, and this page records the attention of ViT / DeiT (multi-head "
                      "self-attention) or EfficientViT (cascaded group attention) models."]
    assert any(f"{REG4} runs with RANDOM weights" in w.value for w in app.warning)
    assert len(app.get("plotly_chart")) >= 2 and len(app.get("image")) == 1
    assert app.get("image")[0].captions[0].startswith(f"{REG4} (random weights), block 3")

    app.session_state["hr_timm"] = GAP  # no class token: the whole-image query is the mean attention received
    app.session_state["hr_random_models"] = [GAP]
    app.run()
    assert not app.exception and not app.error, (app.exception, [e.value for e in app.error])
    assert "mean attention received (no CLS token)" in app.get("image")[0].captions[0]


def test_head_redundancy_page_without_weights_says_where_to_put_them(no_weights):
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(_page("head_redundancy"), default_timeout=180)
    app.session_state["hr_models"] = []
    app.session_state["hr_timm"] = CLS
    app.run()
    assert not app.exception, app.exception
    message = " ".join(i.value for i in app.info)  # missing weights: an info with the fix, not an error
    assert f"No pretrained weights found for {CLS}" in message and f"Put {CLS}.safetensors (or .pth)" in message
    assert not app.error


def test_throughput_page_times_a_typed_vit_with_tome():
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(_page("throughput"), default_timeout=240)
    app.session_state["tp_models"] = []
    app.session_state["tp_timm"] = CLS
    app.session_state["tp_ToMe_tome"] = [2]
    app.session_state["tp_batch"] = 2
    app.session_state["tp_iters"] = 1
    app.session_state["tp_rounds"] = 1
    app.run()
    assert not app.exception, app.exception
    assert app.selectbox(key="tp_baseline").options == [CLS, f"{CLS}@tome=2"]
    app.button(key="tp_run").click().run()
    assert not app.exception, [e.value for e in app.exception]
    table = app.dataframe[0].value.set_index("model")
    assert set(table.index) == {CLS, f"{CLS}@tome=2"} and (table["img_per_s"] > 0).all()
    assert table.loc[CLS, "speedup"] == 1.0


def test_frontier_and_channel_importance_refuse_a_backbone_without_head_in_one_sentence():
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(_page("channel_importance"), default_timeout=120)
    app.session_state["ci_timm"] = "vit_small_patch14_dinov2"
    app.session_state["ci_random"] = True
    app.run(timeout=120)
    assert not app.exception, app.exception
    assert [e.value for e in app.error][:1] == [
        "vit_small_patch14_dinov2 gives image features (timm num_classes=0: no classification head), and this page "
        "needs image classification."]

    frontier = AppTest.from_file(_page("frontier"), default_timeout=120)
    frontier.session_state["fr_models"] = []
    frontier.session_state["fr_timm"] = f"vit_small_patch14_dinov2 {CLS}"
    frontier.run()
    assert not frontier.exception, frontier.exception
    assert frontier.error[0].value.startswith("vit_small_patch14_dinov2 gives image features")
    # The typed 4-block ViT gets ToMe's values; DynamicViT (predictors before blocks 3, 6, 9) is not offered.
    offered = {w.key for w in frontier.multiselect}
    assert "fr_values_tome" in offered and "fr_values_dynamicvit" not in offered


# ----------------------------------------------------------------------------------------------- weights

def test_weights_resolve_from_a_file_named_after_the_model_then_the_hub_then_say_where(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from models import weights as W
    from models.checkpoints import WeightsNotFoundError
    from models.loading import build_random, load_model

    name = "vit_base_patch16_224.augreg_in21k_ft_in1k"
    spec = get_spec(name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as missing:
        W.resolve(spec, folder=tmp_path)
    message = str(missing.value)
    assert f"Put {name}.safetensors (or .pth) in the folder {tmp_path}" in message
    assert f"timm's '{name}' on the Hugging Face hub" in message
    monkeypatch.setattr(W, "hub_offline", lambda: False)
    monkeypatch.setattr(W, "host_reachable", lambda *a, **k: True)
    monkeypatch.setattr(W, "in_hf_cache", lambda spec: False)
    assert W.resolve(spec, folder=tmp_path) == W.WeightsSource(W.HUB, name)  # timm's hub id: arch.tag

    # A file named after the typed model (or its architecture) in the weights folder comes first.
    torch.manual_seed(3)
    state = {k: v.contiguous() for k, v in build_random(get_spec(CLS)).state_dict().items()}
    save_file(state, tmp_path / f"{CLS}.safetensors")
    loaded = load_model(CLS, weights_folder=tmp_path, allow_network=False)
    assert loaded.weights.kind == W.LOCAL and loaded.weights.location == str(tmp_path / f"{CLS}.safetensors")
    torch.testing.assert_close(loaded.model.state_dict()["head.weight"], state["head.weight"])


def test_an_uploaded_fine_tuned_checkpoint_is_matched_to_the_typed_model(tmp_path):
    """The sidebar's upload matches a checkpoint by its shapes: a typed model's fine-tuned file fits it alone."""
    from models.loading import build_random, checkpoint_mismatch, matching_models
    from models.registry import REGISTRY

    state = build_random(get_spec(REG4)).state_dict()
    specs = list(REGISTRY.values()) + [get_spec(n) for n in NAMES]
    assert matching_models(state, specs) == [REG4]
    assert "keys missing" in checkpoint_mismatch(state, get_spec(CLS)) or "unexpected" in checkpoint_mismatch(
        state, get_spec(CLS))


def test_dataset_cli_runs_tome_merge_and_taylor_on_a_typed_name(tmp_path, monkeypatch, capsys):
    from analysis.data.images import sample_images
    from analysis.runs.cli import main

    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    folder = tmp_path / "images"
    folder.mkdir()
    for sample in sample_images():
        sample.image.save(folder / f"{sample.name}.jpg")
    common = ["--model", REG4, "--data", str(folder), "--random-weights", "--device", "cpu", "--batch", "2",
              "--workers", "0", "--no-progress"]
    assert main(["tome-merge", *common, "--r", "2", "--out", str(tmp_path / "tome")]) == 0
    assert main(["taylor", *common, "--out", str(tmp_path / "taylor")]) == 0
    run = __import__("json").loads((tmp_path / "tome" / "run.json").read_text())
    assert run["model"]["name"] == REG4 and run["counts"]["images_seen"] == 2
    assert (tmp_path / "tome" / "tome_merge.csv").is_file() and (tmp_path / "taylor" / "taylor_scores.csv").is_file()
    assert main(["taylor", "--model", "vit_nope_patch3", "--data", str(folder), "--out", str(tmp_path / "x")]) == 2
    assert "timm has no model 'vit_nope_patch3'" in capsys.readouterr().err


def _sidebar_then_typed_model():
    """The sidebar as app.py draws it, then a page loading the timm models typed in its 'Other timm models'."""
    import streamlit as st

    from pages._widgets import cached_model, timm_model_names
    from pages._sidebar import sidebar

    sidebar()
    for name in timm_model_names("typed_models", task=None):
        loaded = cached_model(name)
        if loaded is not None:
            st.success(f"{name}: {loaded.weights.description}")


def test_a_fine_tuned_checkpoint_of_a_typed_model_loads_through_the_sidebar_upload(monkeypatch, tmp_path):
    from safetensors.torch import save
    from streamlit.testing.v1 import AppTest

    from models.loading import build_random

    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    app = AppTest.from_function(_sidebar_then_typed_model, default_timeout=120)
    app.session_state["typed_models"] = REG4
    app.run()
    assert not app.exception, app.exception
    assert any(f"No pretrained weights found for {REG4}" in i.value for i in app.info)
    torch.manual_seed(5)
    state = {k: v.contiguous() for k, v in build_random(get_spec(REG4)).state_dict().items()}
    app.sidebar.file_uploader(key="vitlab_upload_ckpt").set_value(
        ("reg4_finetuned.safetensors", save(state), "application/octet-stream")).run()
    assert not app.exception, [e.value for e in app.exception]
    picker = app.sidebar.selectbox(key="vitlab_upload_model")
    assert picker.value == REG4 and picker.options[0] == f"{REG4} (fits)"  # matched against the typed name
    assert not app.error
    assert any(s.value.startswith(f"{REG4}: local file ") and s.value.endswith("reg4_finetuned.safetensors")
               for s in app.success)


def test_what_does_not_apply_says_so_in_one_sentence(batch):
    """A headless backbone has no loss for Taylor importance; a post-norm block is not what ToMe and the recording
    walk; DynamicViT needs one class token and blocks 3, 6, 9. Each is a MethodNotApplicable, never a traceback."""
    from timm.models.vision_transformer import ResPostBlock

    from analysis.channel_importance import taylor_importance
    from models.attention_recording import record_attention
    from models.methods import METHODS
    from models.tome import tome_forward

    headless = VisionTransformer(**dict(TINY, num_classes=0)).eval()
    with pytest.raises(MethodNotApplicable, match="no classification head"):
        taylor_importance(headless, [(batch, None)])
    post_norm = VisionTransformer(**dict(TINY, block_fn=ResPostBlock)).eval()
    with pytest.raises(MethodNotApplicable, match="block 0 is a ResPostBlock"):
        tome_forward(post_norm, batch, r=2)
    with pytest.raises(MethodNotApplicable, match="got ResPostBlock"):
        record_attention(post_norm, batch)
    dynamicvit, evit, tome = METHODS["dynamicvit"], METHODS["evit"], METHODS["tome"]
    assert dynamicvit.not_applicable_reason(get_spec(GAP)) == (
        "DynamicViT needs a ViT with one class token, no register tokens and global_pool='token'.")
    assert dynamicvit.not_applicable_reason(get_spec(CLS)).startswith(
        "DynamicViT prunes before blocks 3, 6, 9, and this model has 4")
    assert evit.not_applicable_reason(get_spec(GAP)) == (
        "EViT ranks patches by the class token's attention, and this model has no class token.")
    # The method table offers each model only what runs on it: DynamicViT's untrained predictors go on DeiT-Tiny
    # alone, EViT not on the model without a class token, ToMe everywhere.
    deit = get_spec("deit_tiny_patch16_224")
    assert dynamicvit.needs_attachment(deit) and not any(dynamicvit.needs_attachment(get_spec(n)) for n in NAMES)
    assert [n for n in NAMES if evit.runs_on(get_spec(n))] == [CLS, REG4]
    assert all(tome.runs_on(get_spec(n)) for n in NAMES) and tome.fits(deit)


def test_token_reduction_page_on_typed_vits_runs_the_methods_that_apply(no_weights):
    """A typed register ViT gets ToMe and EViT (prefix tokens protected) and DynamicViT's untrained predictors where
    they attach; a ViT without a class token gets ToMe, and EViT is not offered (it ranks by the class token)."""
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(_page("token_reduction"), default_timeout=240)
    app.session_state["tr_timm"] = f"{REG4} no_such_vit_patch3"
    app.session_state["tr_random"] = True
    app.run()
    assert not app.exception, app.exception
    assert [e.value for e in app.error] == [
        "timm has no model 'no_such_vit_patch3'; names look like vit_base_patch16_224.augreg_in21k_ft_in1k."]
    assert app.selectbox(key="tr_model").value == REG4  # a newly typed model is the one shown
    subheaders = [s.value for s in app.subheader]
    assert subheaders[0] == "no reduction" and {"ToMe merging", "EViT pruning + fusion"} <= set(subheaders)
    counts = {h.value for h in app.header}
    assert "EViT: kept and fused patches per stage (RANDOM weights)" in counts

    app.session_state["tr_timm"] = GAP
    app.run()
    assert not app.exception, app.exception
    assert app.selectbox(key="tr_model").value == GAP
    assert [s.value for s in app.subheader] == ["no reduction", "ToMe merging"]
