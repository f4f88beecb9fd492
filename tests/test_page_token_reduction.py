"""The token-reduction page: real DeiT-Tiny with untrained DynamicViT predictors, and the missing-weights path."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "token_reduction.py")


@pytest.fixture
def real_weights_folder(shared_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(shared_dir / "weights"))


@pytest.mark.shared
def test_page_on_real_deit_tiny_shows_both_methods_and_sweep(real_weights_folder):
    app = AppTest.from_file(PAGE, default_timeout=180).run()
    assert not app.exception, app.exception
    assert not app.error
    assert app.selectbox(key="tr_model").value == "deit_tiny_patch16_224 + UNTRAINED DynamicViT predictors"
    assert any("untrained" in w.value for w in app.warning)
    headers = [h.value for h in app.header]
    assert headers[0] == "Side by side"  # real weights: no RANDOM tag
    assert any(h.startswith("DynamicViT") for h in headers) and any(h.startswith("ToMe") for h in headers)
    assert any(h.startswith("EViT") for h in headers)
    subheaders = [s.value for s in app.subheader]
    assert subheaders == ["no reduction", "DynamicViT pruning", "ToMe merging", "EViT pruning + fusion"]

    overall = app.dataframe[0].value
    assert list(overall["method"]) == ["no reduction", "DynamicViT pruning", "ToMe merging", "EViT pruning + fusion"]
    assert overall.loc[0, "top-1 agreement"] == 1.0
    top5 = app.table[0].value
    assert list(top5["rank"]) == [1, 2, 3, 4, 5]
    assert len(app.get("plotly_chart")) >= 2  # keep scores, tokens per block (+ keep frequency for 2 images)
    labels = [b.proto.label for b in app.get("download_button")]
    assert "Download stage maps (PNG)" in labels and "Download kept indices per image and stage (CSV)" in labels
    assert "Download merge maps (PNG)" in labels

    app.slider(key="tr_rmax").set_value(3)
    app.button(key="tr_sweep_r").click().run()
    assert not app.exception, app.exception
    assert "Download the r sweep (CSV)" in [b.proto.label for b in app.get("download_button")]


def test_missing_weights_are_explained_and_random_weights_say_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(tmp_path))
    app = AppTest.from_file(PAGE, default_timeout=180).run()
    assert not app.exception, app.exception
    # No DeiT-Tiny file in the empty folder and no hub: a first visit, so an info with the fix, not an error.
    assert not app.error
    assert any("No pretrained weights found for deit_tiny_patch16_224" in i.value
               and "Use random weights (no pretrained file)" in i.value for i in app.info)
    assert not app.header  # nothing computed

    app.checkbox(key="tr_random").check()
    app.run()
    assert not app.exception, app.exception
    assert any("RANDOM" in w.value for w in app.warning)
    assert all("(RANDOM weights)" in h.value for h in app.header)


def test_fade_keeps_kept_patches_and_whitens_dropped_ones():
    import numpy as np
    from PIL import Image

    from analysis.token_reduction import fade_dropped_patches

    pixels = np.full((32, 32, 3), 40, dtype=np.uint8)
    keep = np.array([True, False, False, True])  # 2x2 grid of 16-px patches
    faded = np.asarray(fade_dropped_patches(Image.fromarray(pixels), keep, (2, 2), fade=0.5)).astype(int)
    assert (faded[:16, :16] == 40).all() and (faded[16:, 16:] == 40).all()
    assert (faded[:16, 16:] == round(40 * 0.5 + 255 * 0.5)).all()


def test_comparison_on_small_random_dynamicvit():
    import torch

    from analysis.token_reduction import agreement_frame, compare_reductions, kept_indices_frame, tokens_per_block
    from models.dynamicvit import DynamicViT
    from models.methods import METHODS

    torch.manual_seed(0)
    model = DynamicViT(img_size=64, patch_size=8, embed_dim=48, depth=12, num_heads=3, num_classes=10).eval()
    comparison = compare_reductions(model, torch.randn(2, 3, 64, 64), ["a", "b"],
                                    [METHODS["dynamicvit"], METHODS["tome"], METHODS["evit"]],
                                    {"dynamicvit": {"rho": 0.5}, "tome": {"tome": 4, "prop_attn": True}})
    counts = tokens_per_block(comparison)
    assert counts["ToMe merging"][:3] == [65, 61, 57]
    assert counts["DynamicViT pruning"][3] == 1 + 32 and counts["DynamicViT pruning"][-1] == 1 + 8
    # EViT at its default keep rate 0.7 inside blocks 3, 6, 9: CLS, ceil(0.7 n) kept and one fused token after each
    assert counts["EViT pruning + fusion"] == [65] * 4 + [1 + 45 + 1] * 3 + [1 + 33 + 1] * 3 + [1 + 24 + 1] * 2
    frame = agreement_frame(comparison)
    assert frame["top-1 agreement"].between(0, 1).all() and frame.loc[0, "top-1 agreement"] == 1.0
    kept = kept_indices_frame(comparison.runs["dynamicvit"].trace, ["a", "b"])
    assert len(kept) == 6 and kept.loc[0, "kept"] == 32


def _png(colour, size=(64, 48)) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def random_page(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(tmp_path))
    app = AppTest.from_file(PAGE, default_timeout=180)
    app.session_state["tr_random"] = True
    return app.run()


def test_every_export_names_model_weights_images_and_settings(random_page, downloads, monkeypatch):
    """Issue 20: rho and r in every CSV, ToMe's exports without DynamicViT's predictors, no '.jpg.png' names."""
    import io

    import pandas as pd

    import analysis.token_reduction.pictures as token_maps

    titles = []
    original = token_maps.with_title
    monkeypatch.setattr(token_maps, "with_title", lambda picture, title: titles.append(title) or original(picture,
                                                                                                            title))
    app = random_page
    app.file_uploader(key="tr_images").set_value([("first.jpg", _png((200, 30, 30)), "image/png"),
                                                  ("second.png", _png((30, 200, 30)), "image/png")])
    app.slider(key="tr_rho").set_value(0.6)
    app.slider(key="tr_r").set_value(4).run()
    app.button(key="tr_sweep_r").click()
    app.slider(key="tr_rmax").set_value(2).run()
    assert not app.exception, app.exception
    names = ["first.jpg", "second.png"]
    backbone, pruned = "random", "random + untrained DynamicViT predictors"
    for csv in ("top5_predictions.csv", "agreement.csv", "tome_r_sweep.csv", "tokens_per_block.csv",
                "dynamicvit_kept_indices.csv"):
        frame = pd.read_csv(io.BytesIO(downloads[csv]))
        assert list(frame.columns[:3]) == ["model", "weights", "image"], csv
        assert (frame["model"] == "deit_tiny_patch16_224").all(), csv
        if csv != "tome_r_sweep.csv":  # the sweep's rows each have their own r
            assert (frame["rho"] == 0.6).all() and (frame["predictors"] == "untrained").all(), csv
            assert (frame["tome_r"].astype(str) == "4").all(), csv
            assert frame["tome_proportional_attention"].all(), csv
    sweep = pd.read_csv(io.BytesIO(downloads["tome_r_sweep.csv"]))
    assert (sweep["weights"] == backbone).all() and b"DynamicViT" not in downloads["tome_r_sweep.csv"]
    assert sweep["tome_proportional_attention"].all()
    assert (pd.read_csv(io.BytesIO(downloads["dynamicvit_kept_indices.csv"]))["weights"] == pruned).all()
    for csv in ("agreement.csv", "top5_predictions.csv"):
        frame = pd.read_csv(io.BytesIO(downloads[csv]))
        by_method = frame.drop_duplicates("method").set_index("method")
        assert by_method.loc["ToMe merging", "weights"] == backbone, csv
        assert by_method.loc["no reduction", "weights"] == backbone, csv
        assert by_method.loc["DynamicViT pruning", "weights"] == pruned, csv
        assert by_method.loc["ToMe merging", "setting"].startswith("r=4 "), csv
        assert by_method.loc["DynamicViT pruning", "setting"].startswith("rho=0.6"), csv
    top5 = pd.read_csv(io.BytesIO(downloads["top5_predictions.csv"]))
    assert set(top5["image"]) == set(names) and len(top5) == len(names) * 4 * 5  # unreduced + 3 methods

    pngs = [n for n in downloads if n.endswith(".png")]
    assert "dynamicvit_stages_deit_tiny_patch16_224_rho0.6_first.png" in pngs
    assert "tome_merge_maps_deit_tiny_patch16_224_r4_first.png" in pngs
    assert not [n for n in pngs if n.count(".") > 2 or ".jpg" in n or ".png." in n]
    tome_title = next(t for t in titles if t.startswith("ToMe"))
    assert "DynamicViT" not in tome_title and "r=4" in tome_title and "first.jpg" in tome_title
    stage_title = next(t for t in titles if t.startswith("DynamicViT"))
    assert "rho=0.6" in stage_title and pruned in stage_title
    charts = " ".join(c.proto.spec for c in app.get("plotly_chart"))  # a chart's own PNG download has its title
    assert "keep scores per stage, rho 0.60" in charts and "at each stage, rho 0.60" in charts


def test_selection_follows_the_current_image_set(random_page):
    app = random_page
    samples = app.selectbox(key="tr_image").options
    app.selectbox(key="tr_image").set_value(samples[1]).run()
    app.file_uploader(key="tr_images").set_value([("first.png", _png((200, 30, 30)), "image/png"),
                                                  ("second.png", _png((30, 200, 30)), "image/png")]).run()
    assert not app.exception, app.exception
    picker = app.selectbox(key="tr_image")
    assert picker.options == ["first.png", "second.png"] and picker.value == "first.png"
    assert any(h.value.startswith("Side by side") for h in app.header)


def test_banner_follows_the_backbone_weights(random_page):
    warnings = " ".join(w.value for w in random_page.warning)
    assert "the same RANDOM backbone" in warnings and "real backbone" not in warnings


def test_a_slider_reruns_only_its_method(random_page, monkeypatch):
    import analysis.token_reduction as token_maps

    calls = []
    original_reference, original_run = token_maps.reference_run, token_maps.method_run
    monkeypatch.setattr(token_maps, "reference_run", lambda *a, **k: calls.append("reference") or
                        original_reference(*a, **k))
    monkeypatch.setattr(token_maps, "method_run", lambda model, batch, method, settings: calls.append(method.key) or
                        original_run(model, batch, method, settings))
    app = random_page
    app.slider(key="tr_rho").set_value(0.5).run()
    assert calls == ["dynamicvit"]
    app.slider(key="tr_r").set_value(4).run()
    assert calls == ["dynamicvit", "tome"]
    app.slider(key="tr_rho").set_value(0.7).run()  # back to a setting already computed: nothing runs
    assert calls == ["dynamicvit", "tome"]
    app.slider(key="tr_keep_rate").set_value(0.5).run()
    assert calls == ["dynamicvit", "tome", "evit"]


def test_r_sweep_axis_ticks_at_round_numbers():
    from analysis.token_reduction.metrics import AgreementRow, plot_agreement

    rows = [AgreementRow(r, 1.0, 1.0, 197 - 11 * r, 1.0) for r in range(0, 17)]
    axis = plot_agreement(rows).layout.xaxis
    assert axis.dtick == 2 and axis.tick0 == 0
    assert plot_agreement(rows[:4]).layout.xaxis.dtick == 1


# ---------------------------------------------------------------------------------------------------------
# The DynamicViT zoo: hierarchical models (structured sparsification of ConvNeXt / Swin), no ToMe
# ---------------------------------------------------------------------------------------------------------
ZOO_HEADERS = {"dynamiccnn_convnext_tiny": "DynamicCNN", "dynamicswin_tiny": "DynamicSwin"}


def _image_captions(app) -> list[str]:
    return [element.proto.imgs[0].caption for element in app.get("image") if element.proto.imgs]


@pytest.fixture(params=sorted(ZOO_HEADERS))
def zoo_page(request, tmp_path, monkeypatch, downloads):
    """The page on a random-weights hierarchical zoo model and the two sample photos."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(tmp_path))
    app = AppTest.from_file(PAGE, default_timeout=240)
    app.session_state["tr_model"] = request.param
    app.session_state["tr_random"] = True
    return request.param, app.run(), downloads


def test_zoo_model_shows_stage_maps_and_keep_frequency_without_tome(zoo_page):
    import io

    import pandas as pd
    from PIL import Image

    name, app, downloads = zoo_page
    assert not app.exception, app.exception
    assert not app.error
    assert app.slider(key="tr_rho").value == 0.7  # the release's trained keep ratio
    assert any(f"{name} runs with RANDOM weights" in w.value for w in app.warning)
    headers = [h.value for h in app.header]
    assert f"{ZOO_HEADERS[name]}: positions on the full path per stage (RANDOM weights)" in headers
    assert not any("ToMe" in h for h in headers)
    assert [s.value for s in app.subheader] == ["no reduction", f"{ZOO_HEADERS[name]} pruning"]
    assert any(c.value.startswith(f"Not shown for {name}") and "ToMe applies to" in c.value for c in app.caption)
    assert any("full MLP path" in caption for caption in _image_captions(app))
    assert len(app.get("plotly_chart")) == 3  # keep scores, keep frequency over the 2 images, positions per block
    names = app.selectbox(key="tr_image").options
    assert len(names) == 2

    # Stage maps: the input and three stage panels of the 224 px view, titled with model, weights and image.
    strip = Image.open(io.BytesIO(downloads[f"dynamicvit_stages_{name}_rho0.7_{names[0]}.png"]))
    assert strip.size[0] == 4 * 224 + 3 * 6 and 224 + 18 + 14 < strip.size[1] < 224 + 18 + 40  # one title line
    kept = pd.read_csv(io.BytesIO(downloads["dynamicvit_kept_indices.csv"]))
    assert list(kept.columns[:3]) == ["model", "weights", "image"]
    assert (kept["model"] == name).all() and (kept["weights"] == "random").all()
    assert set(kept["image"]) == set(names) and len(kept) == 2 * 3
    assert list(kept.groupby("stage")["kept"].max()) == [137, 97, 58]  # rho, rho - 0.2, rho - 0.4 of 196
    assert (kept["grid"] == "14x14").all() and kept["before block"].str.contains(r"\.2\.blocks\.").all()
    for csv in ("top5_predictions.csv", "agreement.csv", "tokens_per_block.csv"):
        frame = pd.read_csv(io.BytesIO(downloads[csv]))
        assert list(frame.columns[:3]) == ["model", "weights", "image"], csv
        assert (frame["model"] == name).all() and (frame["weights"] == "random").all(), csv
    counts = pd.read_csv(io.BytesIO(downloads["tokens_per_block.csv"]))
    assert counts["no reduction"].iloc[0] == 56 * 56 and counts["no reduction"].min() == 7 * 7
    assert counts[f"{ZOO_HEADERS[name]} pruning"].min() == 49 and 58 in set(counts[f"{ZOO_HEADERS[name]} pruning"])
    assert not [b for b in app.button if b.key == "tr_sweep_r"] and "tome_r_sweep.csv" not in downloads


def test_zoo_page_says_when_rho_is_not_the_trained_one(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(tmp_path))
    app = AppTest.from_file(PAGE, default_timeout=240)
    app.session_state["tr_model"] = "dynamiccnn_convnext_tiny"
    app.session_state["tr_random"] = True
    app.run()
    assert not any("trained for rho" in i.value for i in app.info)
    app.slider(key="tr_rho").set_value(0.4).run()  # rho - 0.4 leaves nothing in the last stage
    assert not app.exception, app.exception
    assert any("use rho > 0.4" in e.value for e in app.error)
    app.slider(key="tr_rho").set_value(0.9).run()
    assert not app.exception and not app.error
    assert any("was trained for rho = 0.7" in i.value for i in app.info)
    # Another model starts at its own trained keep ratio.
    app.selectbox(key="tr_model").set_value("dynamicswin_tiny").run()
    assert app.slider(key="tr_rho").value == 0.7 and not any("trained for rho" in i.value for i in app.info)


def test_stage_maps_are_drawn_to_the_scale_of_their_grid():
    import numpy as np
    import torch
    from PIL import Image

    from analysis.token_reduction import dynamicvit_stage_panels, keep_frequency, keep_score_figure
    from models.dynamic_zoo import DynamicStageTrace

    # One 7x7 stage on a 224-px image: 32-px cells; image 0 keeps the top-left cell, image 1 the last one.
    trace = DynamicStageTrace("test", 0.5, (224, 224), [(7, 7)], ["stages.2.blocks.1"], nested=False,
                              kept_indices=[torch.tensor([[0], [48]])], keep_scores=[torch.rand(2, 49)],
                              tokens_per_block=[1])
    canvas = Image.new("RGB", (224, 224), (40, 40, 40))
    panel = np.asarray(dynamicvit_stage_panels(canvas, trace, 0)[1][1]).astype(int)
    assert (panel[1:31, 1:31] == 40).all()  # the kept 32-px cell, inside its faint border
    assert (panel[1:31, 33:63] > 200).all() and (panel[200:, 200:] > 200).all()
    assert (panel[32, 5] != panel[31, 5]).all()  # a cell border at row 32
    heatmap = keep_score_figure(trace, 0).data[0]
    assert heatmap.dx == heatmap.dy == 32 and heatmap.x0 == 16
    frequency = keep_frequency(trace, 0)
    assert frequency.shape == (7, 7) and frequency[0, 0] == frequency[6, 6] == 0.5 and frequency.sum() == 1.0


def test_model_choices_loop_over_the_registry_and_the_method_table():
    from analysis.token_reduction import methods_running_on, model_choices
    from models.methods import METHODS
    from models.registry import IMAGE_CLASSIFICATION, REGISTRY

    choices = model_choices()
    untrained_on_tiny = next(iter(choices))  # the page's default: real DeiT-Tiny with untrained predictors
    assert untrained_on_tiny == "deit_tiny_patch16_224 + UNTRAINED DynamicViT predictors"
    attached = {c.name for c in choices.values() if c.untrained_predictors}
    assert attached == {n for n, s in REGISTRY.items() if any(m.needs_attachment(s) for m in METHODS.values())}
    plain = {c.name for c in choices.values() if not c.untrained_predictors}
    assert plain == {n for n, s in REGISTRY.items() if methods_running_on(s) and s.task == IMAGE_CLASSIFICATION}
    assert {"dynamicvit_deit_small_patch16_224", "dynamicvit_lvvit_s", "dynamiccnn_convnext_tiny",
            "dynamicswin_tiny", "deit_tiny_patch16_224"} <= plain and "convnext_tiny" not in plain
    labels = lambda name: [m.label for m in choices[name].methods()]  # noqa: E731
    assert labels("deit_tiny_patch16_224") == ["ToMe", "EViT"]
    assert labels(untrained_on_tiny) == ["DynamicViT", "ToMe", "EViT"]
    assert labels("dynamicvit_deit_small_patch16_224") == ["DynamicViT", "ToMe", "EViT"]  # its DeiT backbone too
    for name in ("dynamicvit_lvvit_s", "dynamiccnn_convnext_tiny", "dynamicswin_tiny"):
        assert len(labels(name)) == 1 and labels(name)[0].startswith("Dynamic"), name


def test_untrained_keep_scores_are_scaled_to_their_range_and_explained():
    """Issue 20: untrained predictors' scores (0.49995-0.50012) drawn on a 0-1 scale were flat squares."""
    import torch

    from analysis.token_reduction import keep_score_figure, keep_score_note
    from models.dynamic_zoo import DynamicStageTrace

    def trace(scores):
        return DynamicStageTrace("test", 0.7, (224, 224), [(14, 14)], ["blocks.3"], nested=True,
                                 kept_indices=[torch.arange(137).expand(1, 137)], keep_scores=[scores],
                                 tokens_per_block=[197])

    flat = trace(0.49995 + 0.00017 * torch.rand(1, 196, generator=torch.Generator().manual_seed(0)))
    heatmap = keep_score_figure(flat, 0).data[0]
    assert 0.49994 < heatmap.zmin < 0.49997 and 0.5001 < heatmap.zmax < 0.50013
    assert heatmap.colorbar.tickformat not in (None, ".2f")  # ticks that tell 0.49995 from 0.50010
    note = keep_score_note(flat, 0)
    assert note and "near 0.5" in note and "Untrained" in note
    trained = trace(torch.linspace(0.02, 0.98, 196).view(1, 196))
    assert keep_score_note(trained, 0) is None
    assert keep_score_figure(trained, 0).data[0].zmin == pytest.approx(0.02)


def test_dynamiccnn_caption_explains_97_of_196():
    """Issue 20: DynamicCNN keeps 97 of 196 at its second stage where a user computes 98."""
    import torch

    from analysis.token_reduction import stage_maps_caption
    from models.dynamic_zoo import DynamicStageTrace, linear_counts

    counts = linear_counts(196, 0.7)
    assert counts == [137, 97, 58]
    trace = DynamicStageTrace("DynamicCNN", 0.7, (224, 224), [(14, 14)] * 3, ["b1", "b2", "b3"], nested=False,
                              kept_indices=[torch.arange(c).expand(1, c) for c in counts],
                              keep_scores=[torch.rand(1, 196)] * 3, tokens_per_block=[1])
    caption = stage_maps_caption(trace)
    assert "keeps 97 of 196, not 98" in caption and "0.49999999999999994" in caption
    assert "Stage 1 keeps" not in caption and "Stage 3 keeps" not in caption  # 137 and 58 are what N x ratio gives


def test_r_sweep_leaves_no_progress_bar(random_page):
    app = random_page
    app.button(key="tr_sweep_r").click()
    app.slider(key="tr_rmax").set_value(2).run()
    assert not app.exception, app.exception
    assert "Download the r sweep (CSV)" in [b.proto.label for b in app.get("download_button")]
    assert not app.get("progress")


def test_r_sweep_title_fits_and_token_ticks_are_whole_numbers():
    """Issue 20: the sweep's title was cut off and its right axis read 203.3, 162.6."""
    from analysis.token_reduction.metrics import AgreementRow, plot_agreement

    rows = [AgreementRow(r, 1.0, 1.0, 197 - 11 * r, 1.0) for r in range(0, 17)]
    title = ("ToMe agreement: deit_tiny_patch16_224, local file /home/someone/weights/deit_tiny_patch16_224."
             "safetensors, 5 images: photo_1.jpg, photo_2.jpg, photo_3.jpg, photo_4.jpg, photo_5.jpg")
    figure = plot_agreement(rows, title)
    lines = figure.layout.title.text.split("<br>")
    assert len(lines) > 1 and all(len(line) <= 90 for line in lines)
    assert " ".join(lines).replace("  ", " ") == title
    assert figure.layout.margin.t >= 40 + 20 * len(lines)
    tokens = figure.layout.yaxis2
    assert tokens.tickformat == "d" and float(tokens.dtick).is_integer() and tokens.tickmode == "linear"


def test_prediction_tables_show_whole_class_names(random_page):
    """Issue 30: class names cut mid-word ('mountain ter', 'mosquito ne') in the narrow per-method grids, which
    size a column by an estimate of its text's width; a static table wraps a long name instead."""
    from analysis.data.images import imagenet_label

    names = {imagenet_label(i) for i in range(1000)}
    assert len(random_page.table) == len(random_page.subheader)  # one per method's panel
    for table in random_page.table:
        frame = table.value
        assert list(frame.columns) == ["rank", "class", "probability"] and list(frame["rank"]) == [1, 2, 3, 4, 5]
        assert set(frame["class"]) <= names


# ---------------------------------------------------------------------------------------------------------
# Issue 30: the page offers only what it can run
# ---------------------------------------------------------------------------------------------------------
def test_model_choices_are_image_classifiers_only():
    """PuMer's vision-language models live on their own page: here they crashed (no image transform)."""
    from analysis.token_reduction import model_choices
    from models.registry import IMAGE_CLASSIFICATION, REGISTRY, get_spec

    headless = "vit_small_patch14_dinov2"  # a typed timm backbone without a classification head (ToMe runs on it)
    choices = model_choices([headless])
    assert choices and all(get_spec(c.name).task == IMAGE_CLASSIFICATION for c in choices.values())
    assert any(s.task != IMAGE_CLASSIFICATION for s in REGISTRY.values())  # there is something to leave out
    assert headless not in {c.name for c in choices.values()}


def _offered_labels() -> list[str]:
    from analysis.token_reduction import model_choices

    return list(model_choices())


def _other_value(setting, value):
    """A value of ``setting`` other than ``value``: the largest of its choices, as a user moving the slider."""
    return max(c for c in setting.choices if c != value)


@pytest.mark.parametrize("label", _offered_labels())
def test_every_offered_model_runs_and_reruns_with_random_weights(label, tmp_path, monkeypatch):
    """Each model of the picker, with random weights on one sample photo: a run, then a rerun after its first
    method's main slider moves, without an exception or an error box."""
    import pages._widgets
    from analysis.token_reduction import model_choices

    one_photo = pages._widgets.sample_images()[:1]  # the forwards at the model's size cost most: one image, not two
    monkeypatch.setattr(pages._widgets, "sample_images", lambda: one_photo)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(tmp_path))
    app = AppTest.from_file(PAGE, default_timeout=240)
    app.session_state["tr_model"] = label
    app.session_state["tr_random"] = True
    app.run()
    assert not app.exception, app.exception
    assert not app.error, [e.value for e in app.error]
    assert app.selectbox(key="tr_model").value == label
    setting = model_choices()[label].methods()[0].main_setting
    slider = app.slider(key=f"tr_{setting.symbol}")
    slider.set_value(_other_value(setting, slider.value)).run()
    assert not app.exception, app.exception
    assert not app.error, [e.value for e in app.error]
    assert any(h.value.startswith("Side by side") for h in app.header)


def test_r_sweep_runs_the_chosen_schedule_and_names_it(random_page, downloads):
    """Issue 30: at r = 8 decreasing the side by side said 106 tokens in the last block and the sweep 109 (it ran
    the constant schedule)."""
    import io
    import json

    import pandas as pd

    app = random_page
    app.slider(key="tr_r").set_value(8)
    app.radio(key="tr_r_schedule").set_value("decreasing").run()
    app.button(key="tr_sweep_r").click()
    app.slider(key="tr_rmax").set_value(8).run()
    assert not app.exception, app.exception
    per_block = pd.read_csv(io.BytesIO(downloads["tokens_per_block.csv"]))
    sweep = pd.read_csv(io.BytesIO(downloads["tome_r_sweep.csv"]))
    at_8 = sweep[sweep["tome_r"] == 8].iloc[0]
    assert at_8["tokens_last_block"] == per_block["ToMe merging"].iloc[-1]
    assert (sweep["schedule"] == "decreasing").all()
    rows = json.loads(downloads["tome_r_sweep.json"])
    assert {row["schedule"] for row in rows} == {"decreasing"} and len(rows) == len(sweep)
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in app.get("plotly_chart")]
    sweep_title = next(t for t in titles if t.startswith("ToMe merging agreement"))
    assert "decreasing schedule" in sweep_title
