"""Every page listed in app.py renders through AppTest without an exception."""
import re
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
PAGE_FILES = re.findall(r'st\.Page\("(pages/\w+\.py)"', (ROOT / "app.py").read_text())


@pytest.fixture
def real_weights_folder(shared_dir, monkeypatch):
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(shared_dir / "weights"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_app_lists_pages_that_exist():
    assert "pages/home.py" in PAGE_FILES
    for page in PAGE_FILES:
        assert (ROOT / page).is_file(), page


@pytest.mark.shared
@pytest.mark.parametrize("page", PAGE_FILES)
def test_page_renders_without_exception(page, real_weights_folder):
    at = AppTest.from_file(str(ROOT / page), default_timeout=240).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title or at.header, f"{page} shows no title"


@pytest.mark.shared
def test_home_shows_hardware_and_weights_status(real_weights_folder):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    assert not at.exception
    assert at.title[0].value == "ViT Efficiency Lab"
    weights = at.table[0].value
    assert weights.loc["deit_tiny_patch16_224", "weights"] == "local file"
    assert weights.loc["deit_small_patch16_224", "weights"] == "missing"
    assert at.sidebar.selectbox[0].label == "Device" and "cpu" in at.sidebar.selectbox[0].options


def test_home_names_a_first_step_and_every_file_a_model_needs(tmp_path, monkeypatch):
    """Issue 30: Home named no first step, and its METER row asked for the .ckpt alone while the page also needs
    the roberta-base/ tokenizer folder."""
    from models import meter

    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    at = AppTest.from_file(str(ROOT / "pages" / "home.py"), default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Start here" in [s.value for s in at.subheader]
    start = next(m.value for m in at.markdown if "*Token reduction*" in m.value)
    assert "*Vision-language*" in start and "*Head redundancy*" in start and "*Live throughput*" in start
    weights = at.table[0].value
    meter_row = weights.loc["meter_clip16_288_vqa"]
    assert meter_row["weights"] == "missing"
    assert "meter_clip16_288_roberta_vqa.ckpt" in meter_row["where"]
    assert f"{meter.ROBERTA_FOLDER_NAME}/" in meter_row["where"] and meter.ROBERTA_REPO in meter_row["where"]
    assert str(tmp_path / meter.ROBERTA_FOLDER_NAME) in meter_row["where"]
    assert "roberta" not in weights.loc["deit_tiny_patch16_224", "where"]
