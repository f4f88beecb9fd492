"""The vision-language page: a clear message without weights, and the full walk-through with the random ViLT."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "vision_language.py")


@pytest.fixture
def offline_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(tmp_path))
    return tmp_path


def test_missing_weights_are_explained(offline_without_weights):
    app = AppTest.from_file(PAGE, default_timeout=120).run()
    assert not app.exception
    message = " ".join(e.value for e in app.error)
    assert str(offline_without_weights / "vilt-b32-finetuned-vqa") in message
    assert "download dandelin/vilt-b32-finetuned-vqa" in message
    assert app.checkbox(key="vl_random").value is False
    assert not app.dataframe  # nothing computed without a model


def test_random_vilt_shows_answers_layers_and_downloads(offline_without_weights):
    app = AppTest.from_file(PAGE, default_timeout=120).run()
    app.checkbox(key="vl_random").check().run()
    assert not app.exception
    assert any("Random weights" in w.value for w in app.warning)
    assert not app.error

    answers = app.dataframe[0].value
    assert list(answers["rank"]) == [1, 2, 3, 4, 5]
    assert {"ViLT answer", "ViLT+PuMer answer"} <= set(answers.columns)
    assert [t.label for t in app.tabs] == ["Layer 2", "Layer 5", "Layer 8"]
    assert app.metric[0].value.endswith("x")
    steps = app.dataframe[1].value
    assert list(steps["layer"]) == [2, 5, 8] and (steps["image_pruned"] > 0).all()
    assert len(app.get("download_button")) == 2 * 3 + 3

    app.radio(key="vl_layers").set_value("Visual entailment: layers 2, 4, 6, 8").run()
    assert not app.exception
    assert [t.label for t in app.tabs] == ["Layer 2", "Layer 4", "Layer 6", "Layer 8"]
