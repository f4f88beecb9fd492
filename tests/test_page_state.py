"""Issue 20: what a user chose, uploaded and computed survives going to another page and back (AppTest through
app.py's st.navigation), a widget is drawn at the value the page computes with, and the sidebar's checkpoint
upload says in one sentence what is wrong and never outlives its file."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import streamlit as st
from PIL import Image
from streamlit.testing.v1 import AppTest

from pages._state import RESULTS_KEY, USER_WEIGHTS_KEY

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
HOME, TOKENS = "pages/home.py", "pages/token_reduction.py"


def _png(colour, size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


UPLOADS = [("first.png", _png((200, 30, 30)), "image/png"), ("second.png", _png((30, 30, 200)), "image/png")]


@pytest.fixture
def app(tmp_path, monkeypatch):
    """The whole app (sidebar and navigation) without any weights: every page runs with random weights."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(tmp_path))
    at = AppTest.from_file(APP, default_timeout=240).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _visit(at: AppTest, page: str) -> AppTest:
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _away_and_back(at: AppTest, page: str) -> AppTest:
    _visit(at, HOME)
    assert at.title[0].value == "ViT Efficiency Lab"
    return _visit(at, page)


def _last_key(at: AppTest, slot: str):
    return next(reversed(at.session_state[RESULTS_KEY][slot]))


def test_token_reduction_keeps_uploads_settings_and_results_after_another_page(app):
    at = _visit(app, TOKENS)
    at.checkbox(key="tr_random").check().run()
    at.file_uploader(key="tr_images").set_value(UPLOADS).run()
    at.slider(key="tr_rho").set_value(0.5).run()
    at.slider(key="tr_r").set_value(8).run()
    at.radio(key="tr_r_schedule").set_value("decreasing").run()
    at.selectbox(key="tr_image").set_value("second.png").run()
    assert not at.exception, [e.value for e in at.exception]
    computed = _last_key(at, "tr_dynamicvit")

    _away_and_back(at, TOKENS)
    assert at.checkbox(key="tr_random").value is True
    assert at.slider(key="tr_rho").value == 0.5 and at.slider(key="tr_r").value == 8
    assert at.radio(key="tr_r_schedule").value == "decreasing"
    picker = at.selectbox(key="tr_image")
    assert picker.options == ["first.png", "second.png"] and picker.value == "second.png"
    assert any(c.value == "Using your 2 uploaded images: first.png, second.png" for c in at.caption)
    assert _last_key(at, "tr_dynamicvit") == computed and computed[-1] == 0.5  # same inputs, nothing recomputed
    # A browser that mounts the slider again (after a page switch, or at any time) draws its default: the value.
    assert list(at.slider(key="tr_rho").proto.default) == [0.5]

    at.button(key="tr_images_clear").click().run()
    assert at.selectbox(key="tr_image").options == ["china", "flower"]
    _away_and_back(at, TOKENS)
    assert at.selectbox(key="tr_image").options == ["china", "flower"]  # cleared stays cleared


def test_a_new_model_still_starts_at_its_own_keep_ratio(app):
    at = _visit(app, TOKENS)
    at.checkbox(key="tr_random").check().run()
    at.slider(key="tr_rho").set_value(0.5).run()
    zoo = next(o for o in at.selectbox(key="tr_model").options if o.startswith("dynamicvit_deit_256"))
    at.selectbox(key="tr_model").set_value(zoo).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.slider(key="tr_rho").value == 0.7 and list(at.slider(key="tr_rho").proto.default) == [0.7]
    picked = at.selectbox(key="tr_model").value
    _away_and_back(at, TOKENS)
    assert at.selectbox(key="tr_model").value == picked and at.slider(key="tr_rho").value == 0.7


# page -> [(widget kind, key, value)], set in this order (later options depend on earlier choices)
SETTINGS = {
    "pages/head_redundancy.py": [("multiselect", "hr_models", ["deit_tiny_patch16_224"]),
                                 ("multiselect", "hr_random_models", ["deit_tiny_patch16_224"]),
                                 ("number_input", "hr_max_images", 2),
                                 ("radio", "hr_metric", "head outputs (linear CKA)"),
                                 ("slider", "hr_block", 3)],
    "pages/channel_importance.py": [("checkbox", "ci_random", True), ("slider", "ci_budget", 0.3),
                                    ("selectbox", "ci_norm", "layer")],
    "pages/throughput.py": [("multiselect", "tp_models", ["efficientvit_m0"]), ("number_input", "tp_batch", 2),
                            ("number_input", "tp_iters", 1), ("number_input", "tp_rounds", 1),
                            ("checkbox", "tp_channels_last", True), ("text_input", "tp_extra", "deit_tiny_patch16_224")],
    "pages/frontier.py": [("multiselect", "fr_models", ["efficientvit_m0"]),
                          ("multiselect", "fr_random", ["efficientvit_m0"]), ("number_input", "fr_batch", 1),
                          ("number_input", "fr_rounds", 1)],
    "pages/breakdown.py": [("multiselect", "bd_models", ["efficientvit_m0"]), ("multiselect", "bd_batches", [1, 16]),
                           ("text_input", "bd_variants", "deit_tiny_patch16_224@tome=4"),
                           ("number_input", "bd_iters", 2)],
}


@pytest.mark.parametrize("page", list(SETTINGS))
def test_every_page_keeps_its_settings_after_another_page(app, page):
    at = _visit(app, page)
    for kind, key, value in SETTINGS[page]:
        widget = getattr(at, kind)(key=key)
        (widget.check() if kind == "checkbox" else widget.set_value(value)).run()
        assert not at.exception, [e.value for e in at.exception]
    _away_and_back(at, page)
    for kind, key, value in SETTINGS[page]:
        assert getattr(at, kind)(key=key).value == value, key


def test_head_redundancy_keeps_the_uploads_and_its_image_choice(app):
    at = _visit(app, "pages/head_redundancy.py")
    at.multiselect(key="hr_models").set_value(["deit_tiny_patch16_224"]).run()
    at.multiselect(key="hr_random_models").set_value(["deit_tiny_patch16_224"]).run()
    at.file_uploader(key="hr_images").set_value(UPLOADS).run()
    at.selectbox(key="hr_image").set_value("second.png").run()
    computed = _last_key(at, "hr_analysis")
    _away_and_back(at, "pages/head_redundancy.py")
    picker = at.selectbox(key="hr_image")
    assert picker.options == ["first.png", "second.png"] and picker.value == "second.png"
    assert _last_key(at, "hr_analysis") == computed


def test_vision_language_keeps_question_and_upload_across_models_and_pages(app):
    vilt, meter = "vilt_b32_vqa", "meter_clip16_288_vqa"
    st.cache_resource.clear()
    at = _visit(app, "pages/vision_language.py")
    at.checkbox(key=f"vl_random_{vilt}").check().run()
    at.file_uploader(key="vl_image").set_value(UPLOADS[:1]).run()
    at.text_input(key="vl_question").set_value("What colour is it?").run()
    at.slider(key=f"vl_prune_{vilt}").set_value(0.3).run()
    assert not at.exception, [e.value for e in at.exception]
    asked = _last_key(at, "vl_answer")
    assert asked[2] == "What colour is it?"

    at.radio(key="vl_model").set_value(meter).run()  # no METER weights: the page stops before its inputs
    at.radio(key="vl_model").set_value(vilt).run()
    assert at.text_input(key="vl_question").value == "What colour is it?"
    assert at.slider(key=f"vl_prune_{vilt}").value == 0.3
    assert _last_key(at, "vl_answer") == asked

    _away_and_back(at, "pages/vision_language.py")
    assert at.radio(key="vl_model").value == vilt and at.checkbox(key=f"vl_random_{vilt}").value is True
    assert at.text_input(key="vl_question").value == "What colour is it?"
    assert any(c.value == "Using your 1 uploaded image: first.png" for c in at.caption)
    assert _last_key(at, "vl_answer") == asked  # same image, question and settings: nothing recomputed


# page -> (its image uploader, the widgets that let it run without weights, a widget touched after returning)
UPLOAD_PAGES = {
    TOKENS: ("tr_images", [("checkbox", "tr_random", True)], ("slider", "tr_rho", 0.5)),
    "pages/head_redundancy.py": ("hr_images", [("multiselect", "hr_models", ["deit_tiny_patch16_224"]),
                                               ("multiselect", "hr_random_models", ["deit_tiny_patch16_224"])],
                                 ("radio", "hr_metric", "head outputs (linear CKA)")),
    "pages/channel_importance.py": ("ci_images", [("checkbox", "ci_random", True)], ("slider", "ci_budget", 0.3)),
    "pages/frontier.py": ("fr_images", [("multiselect", "fr_models", ["efficientvit_m0"]),
                                        ("multiselect", "fr_random", ["efficientvit_m0"])],
                          ("number_input", "fr_batch", 1)),
    "pages/vision_language.py": ("vl_image", [("checkbox", "vl_random_vilt_b32_vqa", True)],
                                 ("slider", "vl_prune_vilt_b32_vqa", 0.3)),
}


def _set(at: AppTest, kind: str, key: str, value) -> AppTest:
    widget = getattr(at, kind)(key=key)
    (widget.check() if kind == "checkbox" else widget.set_value(value)).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _uses_uploads(at: AppTest, names: list[str]) -> bool:
    noun = "image" if len(names) == 1 else "images"
    return any(c.value == f"Using your {len(names)} uploaded {noun}: {', '.join(names)}" for c in at.caption)


@pytest.mark.parametrize("page", list(UPLOAD_PAGES))
def test_uploads_stay_whatever_is_touched_after_another_page(app, page):
    """Issue 30: after returning, the uploader is empty; the next rerun must not take that for a removal."""
    uploader, setup, touched = UPLOAD_PAGES[page]
    at = _visit(app, page)
    for kind, key, value in setup:
        _set(at, kind, key, value)
    files = UPLOADS[:1] if page.endswith("vision_language.py") else UPLOADS
    at.file_uploader(key=uploader).set_value(files).run()
    _away_and_back(at, page)
    names = [name for name, _, _ in files]
    assert _uses_uploads(at, names)
    _set(at, *touched)
    assert _uses_uploads(at, names), [c.value for c in at.caption]
    assert not any(c.value.startswith("No upload") for c in at.caption)


def test_new_uploads_replace_the_kept_ones_and_removing_them_goes_back_to_the_samples(app):
    at = _visit(app, TOKENS)
    _set(at, "checkbox", "tr_random", True)
    at.file_uploader(key="tr_images").set_value(UPLOADS).run()
    _away_and_back(at, TOKENS)
    _set(at, "slider", "tr_rho", 0.5)
    third = [("third.png", _png((30, 200, 30)), "image/png")]
    at.file_uploader(key="tr_images").set_value(third).run()  # new files after returning: they replace the kept ones
    assert at.selectbox(key="tr_image").options == ["third.png"]
    _away_and_back(at, TOKENS)
    _set(at, "slider", "tr_rho", 0.6)
    assert _uses_uploads(at, ["third.png"]) and at.selectbox(key="tr_image").options == ["third.png"]

    at.file_uploader(key="tr_images").set_value(UPLOADS).run()
    at.file_uploader(key="tr_images").set_value(None).run()  # the uploader's own remove: back to the samples
    assert at.selectbox(key="tr_image").options == ["china", "flower"]
    _set(at, "slider", "tr_rho", 0.5)
    assert at.selectbox(key="tr_image").options == ["china", "flower"]


def _sidebar_then_home():
    """The sidebar as app.py draws it, then Home."""
    import runpy

    from pages._sidebar import sidebar

    sidebar()
    runpy.run_path("pages/home.py")


def _checkpoint(name: str) -> bytes:
    from safetensors.torch import save

    from models.loading import build_random
    from models.registry import get_spec

    return save({k: v.contiguous() for k, v in build_random(get_spec(name)).state_dict().items()})


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.chdir(ROOT)
    return AppTest.from_function(_sidebar_then_home, default_timeout=240).run()


def test_a_file_that_is_no_checkpoint_gets_one_sentence(home):
    import os

    home.sidebar.file_uploader(key="vitlab_upload_ckpt").set_value(
        ("x.pth", os.urandom(4096), "application/octet-stream")).run()
    assert not home.exception, [e.value for e in home.exception]
    assert [e.value for e in home.sidebar.error] == ["x.pth is not a PyTorch or safetensors checkpoint."]
    assert home.table[0].value.loc["deit_tiny_patch16_224", "weights"] == "missing"
    home.sidebar.file_uploader(key="vitlab_upload_ckpt").set_value(("empty.pth", b"", "application/octet-stream")).run()
    assert [e.value for e in home.sidebar.error] == ["empty.pth is empty: it is not a checkpoint."]  # no temp path


def test_replacing_or_removing_the_upload_updates_home_and_the_pages(home):
    uploader = home.sidebar.file_uploader(key="vitlab_upload_ckpt")
    uploader.set_value(("tiny.safetensors", _checkpoint("deit_tiny_patch16_224"), "application/octet-stream")).run()
    assert home.table[0].value.loc["deit_tiny_patch16_224", "weights"] == "uploaded"

    uploader = home.sidebar.file_uploader(key="vitlab_upload_ckpt")
    uploader.set_value(("m0.safetensors", _checkpoint("efficientvit_m0"), "application/octet-stream")).run()
    table = home.table[0].value
    assert table.loc["efficientvit_m0", "weights"] == "uploaded"
    assert table.loc["deit_tiny_patch16_224", "weights"] == "missing"
    assert list(home.session_state[USER_WEIGHTS_KEY]) == ["efficientvit_m0"]

    home.sidebar.file_uploader(key="vitlab_upload_ckpt").set_value(None).run()
    assert not home.exception, [e.value for e in home.exception]
    assert home.table[0].value.loc["efficientvit_m0", "weights"] == "missing"
    assert home.session_state[USER_WEIGHTS_KEY] == {}


def test_pickled_objects_are_refused_without_torchs_advice(tmp_path):
    import torch

    from models.checkpoints import CheckpointError, read_state_dict

    path = tmp_path / "with_args.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": Image.new("RGB", (1, 1))}, path)
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(path)
    message = str(caught.value)
    assert message.startswith("with_args.pth holds a Python object (PIL.") and "weights_only=False" not in message


def test_a_frontier_of_other_images_says_so(app):
    at = _visit(app, "pages/frontier.py")
    at.multiselect(key="fr_models").set_value(["efficientvit_m0"]).run()
    at.multiselect(key="fr_random").set_value(["efficientvit_m0"]).run()
    at.number_input(key="fr_batch").set_value(1).run()
    at.number_input(key="fr_rounds").set_value(1).run()
    next(b for b in at.button if b.label == "Compute the frontier").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.get("plotly_chart") and not any("other images" in w.value for w in at.warning)

    at.file_uploader(key="fr_images").set_value(UPLOADS).run()
    assert at.get("plotly_chart")  # the last frontier stays, and says what it belongs to
    assert any(w.value.startswith("This frontier was computed on other images (2 images: china, flower)") for w in at.warning)
    _away_and_back(at, "pages/frontier.py")
    assert any("computed on other images" in w.value for w in at.warning)
