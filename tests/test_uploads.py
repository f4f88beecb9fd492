"""Uploads through the UI: images on a page, checkpoints in the sidebar; bad files get messages, not tracebacks."""
import io
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import save
from streamlit.testing.v1 import AppTest

from models.loading import build_random
from models.registry import get_spec
from pages._ui import USER_WEIGHTS_KEY

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
    from pages._ui import cached_model, sidebar

    sidebar()
    cached_model("deit_tiny_patch16_224")


def test_sidebar_checkpoint_upload_is_used_and_a_wrong_one_is_explained(real_weights):
    at = AppTest.from_function(_sidebar_then_load, default_timeout=240).run()
    assert not at.exception and not at.error  # the real DeiT-Tiny from the weights folder
    wrong = {k: v.contiguous() for k, v in build_random(get_spec("efficientvit_m0")).state_dict().items()}
    at.sidebar.selectbox(key="vitlab_upload_model").set_value("deit_tiny_patch16_224")
    at.sidebar.file_uploader(key="vitlab_upload_ckpt").set_value(
        ("m0.safetensors", save(wrong), "application/octet-stream")).run()
    assert not at.exception, [e.value for e in at.exception]
    uploaded = at.session_state[USER_WEIGHTS_KEY]["deit_tiny_patch16_224"]
    assert Path(uploaded).is_file() and uploaded.endswith(".safetensors")
    message = " ".join(e.value for e in at.error)
    assert "does not fit VisionTransformer" in message and "Missing" in message and "Unexpected" in message
