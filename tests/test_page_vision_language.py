"""The vision-language page: a fast, short message without weights, and the full walk-through with the random ViLT."""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pandas as pd
import pytest
import streamlit as st
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
    assert message.count(". ") + message.endswith(".") <= 2 and "Tried" not in message  # two sentences
    assert app.expander[-1].label == "What was tried" and "Tried:" in app.expander[-1].markdown[0].value
    assert app.checkbox(key="vl_random").value is False
    assert not app.dataframe  # nothing computed without a model


def test_a_failed_resolution_is_remembered_until_retry(offline_without_weights, monkeypatch):
    """The slow part (hub attempts) happens once per process, not on every visit; Retry looks again."""
    import models.vilt_pumer as vilt_pumer
    from models.checkpoints import WeightsNotFoundError

    calls = []

    def slow_missing(*args, **kwargs):
        calls.append(1)
        time.sleep(2.5)  # what hub connection attempts cost
        raise WeightsNotFoundError("ViLT-VQA weights were not found. Tried: the hub.")

    monkeypatch.setattr(vilt_pumer, "load_vilt", slow_missing)
    st.cache_resource.clear()
    AppTest.from_file(PAGE, default_timeout=120).run()
    assert len(calls) == 1
    for _ in range(2):  # new visits (new sessions) and reruns
        start = time.perf_counter()
        app = AppTest.from_file(PAGE, default_timeout=120).run()
        assert time.perf_counter() - start < 2.0 and app.error
    app.run()
    assert len(calls) == 1
    app.button(key="vl_retry").click().run()
    assert len(calls) == 2
    st.cache_resource.clear()


def test_random_vilt_shows_answers_layers_and_labelled_downloads(offline_without_weights, downloads):
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
    assert not any(" 1 image tokens" in c.value or "1 text tokens" in c.value for c in app.caption)

    records = json.loads(downloads["pumer_records.json"])
    assert records["model"] == "vilt_tiny_random" and records["weights"].startswith("random")
    assert records["image"] == "china"
    for csv in ("pumer_reduce_steps.csv", "pumer_tokens_per_layer.csv"):
        frame = pd.read_csv(io.BytesIO(downloads[csv]))
        assert list(frame.columns[:3]) == ["model", "weights", "image"]
        assert (frame["image"] == "china").all()
    chart = app.get("plotly_chart")[0].proto.spec
    assert '"text":"layer"' in chart and "china" in chart

    app.radio(key="vl_layers").set_value("Visual entailment: layers 2, 4, 6, 8").run()
    assert not app.exception
    assert [t.label for t in app.tabs] == ["Layer 2", "Layer 4", "Layer 6", "Layer 8"]
