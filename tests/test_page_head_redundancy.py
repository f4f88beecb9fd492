"""The head-redundancy page: real DeiT-Tiny, random-weight MHSA + CGA side by side, and missing weights."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "head_redundancy.py")


@pytest.fixture
def real_weights_folder(shared_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(shared_dir / "weights"))


def _labels(app) -> list[str]:
    return [b.proto.label for b in app.get("download_button")]


@pytest.mark.shared
def test_page_on_real_deit_tiny_with_a_query_patch(real_weights_folder):
    app = AppTest.from_file(PAGE, default_timeout=180)
    app.session_state["hr_models"] = ["deit_tiny_patch16_224"]
    app.session_state["hr_max_images"] = 1
    app.run()
    assert not app.exception, app.exception
    assert not app.error and not app.warning  # real weights: no random-weights banner
    assert not app.info  # trained heads differ: no "nothing to conclude" note
    assert [h.value for h in app.header] == ["Redundancy vs depth", "Head-to-head similarity per block",
                                             "Downloads", "Attention maps on an image"]
    assert len(app.get("plotly_chart")) == 3 and len(app.get("image")) == 1
    assert "Download redundancy per head (CSV)" in _labels(app)
    assert "Download attention maps (PNG)" in _labels(app)

    app.radio(key="hr_query_mode").set_value("a patch").run()  # enables the row/column inputs
    app.number_input(key="hr_row").set_value(3)
    app.slider(key="hr_block").set_value(2)
    app.radio(key="hr_metric").set_value("head outputs (linear CKA)")
    app.run()
    assert not app.exception, app.exception
    caption = app.get("image")[0].captions[0]
    assert "block 2" in caption and "patch (3, 7)" in caption


def test_page_random_weights_mhsa_and_cga_side_by_side(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(tmp_path))
    app = AppTest.from_file(PAGE, default_timeout=180)
    app.session_state["hr_models"] = ["deit_tiny_patch16_224", "efficientvit_m0"]
    app.session_state["hr_random_models"] = ["deit_tiny_patch16_224", "efficientvit_m0"]
    app.session_state["hr_max_images"] = 1
    app.run()
    assert not app.exception, app.exception
    assert sum("RANDOM weights" in w.value for w in app.warning) == 2
    notes = " ".join(i.value for i in app.info)
    assert "deit_tiny_patch16_224 (random weights): every pair of heads" in notes  # no conclusion drawn
    assert "not drawn" in notes and len(app.get("plotly_chart")) == 2  # no MDS of rounding noise
    depth = app.get("plotly_chart")[0]
    assert "random weights" in depth.proto.spec and "Cascaded group attention" in depth.proto.spec
    app.selectbox(key="hr_overlay_model").set_value("efficientvit_m0")
    app.run()
    assert not app.exception, app.exception
    assert "mean attention received" in app.get("image")[0].captions[0]


def test_page_without_weights_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(tmp_path))
    app = AppTest.from_file(PAGE, default_timeout=120)
    app.session_state["hr_models"] = ["efficientvit_m0"]
    app.run()
    assert not app.exception, app.exception
    assert any("No pretrained weights found for efficientvit_m0" in i.value for i in app.info)
    assert not app.error and not app.get("plotly_chart")


@pytest.mark.shared
def test_real_mhsa_beside_untrained_cga_with_weights_on_every_chart_and_export(real_weights_folder, downloads):
    import io

    import pandas as pd

    app = AppTest.from_file(PAGE, default_timeout=180)
    app.session_state["hr_models"] = ["deit_tiny_patch16_224", "efficientvit_m0"]
    app.session_state["hr_random_models"] = ["efficientvit_m0"]  # only EfficientViT runs untrained
    app.session_state["hr_max_images"] = 1
    app.run()
    assert not app.exception, app.exception
    warnings = [w.value for w in app.warning]
    assert len(warnings) == 1 and "efficientvit_m0 runs with RANDOM weights" in warnings[0]
    weights = next(c.value for c in app.caption if c.value.startswith("Weights:"))
    assert "deit_tiny_patch16_224**: local file" in weights and "efficientvit_m0**: random" in weights
    frame = pd.read_csv(io.BytesIO(downloads["head_redundancy.csv"]))
    by_model = frame.groupby("model")["weights"].first()
    assert by_model["efficientvit_m0"] == "random" and by_model["deit_tiny_patch16_224"].startswith("local file ")
    assert frame["image"].nunique() == 1


def test_models_are_offered_by_attention_kind(monkeypatch, tmp_path):
    from models.registry import CGA, MHSA, models_with_attention

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(tmp_path))
    app = AppTest.from_file(PAGE, default_timeout=120)
    app.session_state["hr_models"] = []
    app.run()
    offered = app.multiselect(key="hr_models").options
    assert offered == models_with_attention(MHSA, CGA)
    assert {"deit_tiny_patch16_224", "efficientvit_m0", "dynamicvit_deit_256_patch16_224"} <= set(offered)
    assert not {"mobilenetv3_large_100", "swin_tiny_patch4_window7_224", "vilt_b32_vqa"} & set(offered)

    assert "dynamicvit_lvvit_s" not in offered  # its auxiliary token head is not walked by the recording


def test_attention_png_is_named_after_the_image_without_its_extension(monkeypatch, tmp_path, downloads):
    """Issue 20: 'attention_..._photo.jpg.png'; and the PNG's title must hold the image's name in full."""
    import io

    from PIL import Image

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(tmp_path))
    photo = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(photo, format="JPEG")
    app = AppTest.from_file(PAGE, default_timeout=180)
    app.session_state["hr_models"] = ["deit_tiny_patch16_224"]
    app.session_state["hr_random_models"] = ["deit_tiny_patch16_224"]
    app.run()
    app.file_uploader(key="hr_images").set_value([("red square.jpg", photo.getvalue(), "image/jpeg")]).run()
    assert not app.exception, app.exception
    pngs = [n for n in downloads if n.endswith(".png")]
    assert "attention_deit_tiny_patch16_224_block11_red_square.png" in pngs
    assert not [n for n in pngs if ".jpg" in n], pngs


def test_first_visit_without_weights_is_an_info_with_the_fix_then_shows_what_it_can(monkeypatch, tmp_path):
    """Issue 30: the default models without their weights gave red errors. Missing weights are a first visit, not a
    fault: an info per model with the file to put where and the random-weights choice; a model whose file is
    there is shown beside them."""
    import timm
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(tmp_path))
    app = AppTest.from_file(PAGE, default_timeout=180)
    app.session_state["hr_max_images"] = 1
    app.run()
    assert not app.exception, app.exception
    assert not app.error, [e.value for e in app.error]
    notes = [i.value for i in app.info]
    for name in ("deit_tiny_patch16_224", "efficientvit_m0"):
        note = next(n for n in notes if f"No pretrained weights found for {name}" in n)
        assert f"Put {name}.safetensors (or .pth) in the folder {tmp_path}" in note
        assert "Run these with random weights (untrained)" in note
    assert not app.get("plotly_chart")

    save_file(timm.create_model("deit_tiny_patch16_224").state_dict(), tmp_path / "deit_tiny_patch16_224.safetensors")
    app.run()
    assert not app.exception, app.exception
    assert not app.error, [e.value for e in app.error]
    assert [n for n in (i.value for i in app.info) if "No pretrained weights found" in n] == [
        next(n for n in notes if "efficientvit_m0" in n)]
    assert app.get("plotly_chart") and "Redundancy vs depth" in [h.value for h in app.header]
