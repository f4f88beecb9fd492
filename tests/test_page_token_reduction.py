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
    assert app.selectbox(key="tr_model").value.startswith("DeiT-Tiny backbone + UNTRAINED")
    assert any("untrained" in w.value for w in app.warning)
    headers = [h.value for h in app.header]
    assert headers[0] == "Side by side"  # real weights: no RANDOM tag
    assert any(h.startswith("DynamicViT") for h in headers) and any(h.startswith("ToMe") for h in headers)
    subheaders = [s.value for s in app.subheader]
    assert subheaders == ["no reduction", "DynamicViT pruning", "ToMe merging"]

    overall = app.dataframe[3].value
    assert list(overall["method"]) == ["no reduction", "DynamicViT pruning", "ToMe merging"]
    assert overall.loc[0, "top-1 agreement"] == 1.0
    top5 = app.dataframe[0].value
    assert list(top5["rank"]) == [1, 2, 3, 4, 5]
    assert len(app.get("plotly_chart")) >= 2  # keep scores, tokens per block (+ keep frequency for 2 images)
    labels = [b.proto.label for b in app.get("download_button")]
    assert "Download stage maps (PNG)" in labels and "Download kept indices per image and stage (CSV)" in labels
    assert "Download merge maps (PNG)" in labels

    app.slider(key="tr_rmax").set_value(3)
    app.button(key="tr_sweep").click().run()
    assert not app.exception, app.exception
    assert "Download the r sweep (CSV)" in [b.proto.label for b in app.get("download_button")]


def test_missing_weights_are_explained_and_random_weights_say_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(tmp_path))
    app = AppTest.from_file(PAGE, default_timeout=180).run()
    assert not app.exception, app.exception
    assert app.error  # no DeiT-Tiny file in the empty folder and no hub
    assert not app.header  # nothing computed

    app.checkbox(key="tr_random").check()
    app.run()
    assert not app.exception, app.exception
    assert any("RANDOM" in w.value for w in app.warning)
    assert all("(RANDOM weights)" in h.value for h in app.header)
