"""Uploads through the UI: images on a page, checkpoints in the sidebar; bad files get messages, not tracebacks."""
import io
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import save
from streamlit.testing.v1 import AppTest

from models.loading import build_random
from models.registry import get_spec
from pages._state import USER_WEIGHTS_KEY

ROOT = Path(__file__).resolve().parents[1]


def _png(color=(200, 30, 30), size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def real_weights(shared_dir, monkeypatch):
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(shared_dir / "weights"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_uploaded_images_replace_the_samples_and_broken_ones_are_reported(real_weights):
    at = AppTest.from_file(str(ROOT / "pages" / "token_reduction.py"), default_timeout=240).run()
    assert not at.exception
    at.file_uploader(key="tr_images").set_value([("red.png", _png(), "image/png"),
                                                 ("broken.jpg", b"\xff\xd8 not really", "image/jpeg")]).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("broken.jpg: not a readable image" in e.value for e in at.error)
    assert at.selectbox(key="tr_image").options == ["red.png"]


def _sidebar_then_load():
    """The sidebar as app.py draws it, then a page asking for DeiT-Tiny."""
    from pages._widgets import cached_model
    from pages._sidebar import sidebar

    sidebar()
    cached_model("deit_tiny_patch16_224")


def _state_dict(name: str) -> bytes:
    return save({k: v.contiguous() for k, v in build_random(get_spec(name)).state_dict().items()})


def test_checkpoint_upload_infers_the_model_and_refuses_a_mismatch(monkeypatch, tmp_path):
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    at = AppTest.from_function(_sidebar_then_load, default_timeout=240).run()
    assert any("No pretrained weights found" in i.value for i in at.info)  # no DeiT-Tiny weights anywhere yet
    at.sidebar.file_uploader(key="vitlab_upload_ckpt").set_value(
        ("my_m0.safetensors", _state_dict("efficientvit_m0"), "application/octet-stream")).run()
    assert not at.exception, [e.value for e in at.exception]
    picker = at.sidebar.selectbox(key="vitlab_upload_model")
    assert picker.value == "efficientvit_m0" and picker.options[0] == "efficientvit_m0 (fits)"  # inferred from shapes
    assert Path(at.session_state[USER_WEIGHTS_KEY]["efficientvit_m0"]).name == "my_m0.safetensors"
    assert any("my_m0.safetensors is used for efficientvit_m0" in s.value for s in at.sidebar.success)

    picker.set_value("deit_tiny_patch16_224").run()  # the wrong model: refused at upload time
    message = " ".join(e.value for e in at.sidebar.error)
    assert "my_m0.safetensors does not fit deit_tiny_patch16_224" in message and "It fits efficientvit_m0" in message
    assert "deit_tiny_patch16_224" not in at.session_state[USER_WEIGHTS_KEY]


def _sidebar_then_home():
    """The sidebar as app.py draws it, then the Home page (AppTest reruns of st.navigation skip app.py's sidebar)."""
    import runpy

    from pages._sidebar import sidebar

    sidebar()
    runpy.run_path("pages/home.py")


def test_home_weights_table_shows_the_upload(monkeypatch, tmp_path):
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ROOT)
    at = AppTest.from_function(_sidebar_then_home, default_timeout=240).run()
    table = at.table[0].value
    assert table.loc["deit_tiny_patch16_224", "weights"] == "missing"
    at.sidebar.file_uploader(key="vitlab_upload_ckpt").set_value(
        ("tiny.safetensors", _state_dict("deit_tiny_patch16_224"), "application/octet-stream")).run()
    assert not at.exception, [e.value for e in at.exception]
    table = at.table[0].value
    assert table.loc["deit_tiny_patch16_224", "weights"] == "uploaded"
    assert table.loc["deit_tiny_patch16_224", "where"] == "tiny.safetensors"


def test_matching_models_compares_shapes_with_every_registry_model():
    from models.loading import checkpoint_mismatch, matching_models
    from models.registry import REGISTRY

    tiny = build_random(get_spec("deit_tiny_patch16_224")).state_dict()
    assert matching_models(tiny, REGISTRY.values()) == ["deit_tiny_patch16_224"]
    assert "differ in shape" in checkpoint_mismatch(tiny, get_spec("deit_small_patch16_224"))
