"""The channel-importance page: real DeiT-Tiny on the sample photos, and a random EfficientViT on a labelled folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "channel_importance.py")
DOWNLOADS = ["Download every channel's scores (CSV)", "Download fraction kept per block (CSV)"]


@pytest.fixture
def weights_folder(monkeypatch, tmp_path):
    def use(folder: Path) -> None:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(folder))
    return use


def _in_order(block) -> list:
    """The elements of an AppTest block, depth first, in the order the page shows them."""
    children = getattr(block, "children", None)
    if children is None:
        return [block]
    return [e for key in sorted(children) for e in _in_order(children[key])]


@pytest.mark.shared
def test_real_deit_tiny_on_sample_photos(shared_dir, weights_folder):
    weights_folder(shared_dir / "weights")
    app = AppTest.from_file(PAGE, default_timeout=180).run()
    assert not app.exception, app.exception
    assert not app.error
    assert app.selectbox(key="ci_model").value == "deit_tiny_patch16_224"
    assert [h.value for h in app.header] == ["Which components keep their width", "Per head",
                                            "Taylor (weights) vs activation (captum)", "Downloads"]
    summary = app.dataframe[0].value
    assert list(summary["component"]) == ["embed", "q", "k", "v", "proj", "ffn_hidden"]
    assert summary["channels"].sum() == 192 + 12 * (3 * 192 + 192 + 768)
    assert len(app.get("plotly_chart")) == 4
    agreement = app.dataframe[1].value.set_index("component")
    assert agreement.loc["v", "spearman"] > 0.999  # Linear layers: both variants are equal
    assert [b.proto.label for b in app.get("download_button")] == DOWNLOADS
    shown = _in_order(app.main)
    chart = next(i for i, e in enumerate(shown) if e.type == "plotly_chart" and "channels kept with" in e.proto.spec)
    note = next(i for i, e in enumerate(shown) if e.type == "caption" and "lie on each other" in e.value)
    assert note == chart + 1 and "chart above" in shown[note].value  # issue 30: it said 'below'

    scores_before = dict(app.session_state["vitlab_results"]["ci_scores"])
    assert len(scores_before) == 1 and next(iter(scores_before))[3] == "self"
    app.slider(key="ci_budget").set_value(0.3).run()  # the budget re-ranks; it does not rescore
    assert not app.exception, app.exception
    assert all(app.session_state["vitlab_results"]["ci_scores"][k] is v for k, v in scores_before.items())
    assert any(m.value.startswith("With 30% of all channels kept: **embed** keeps") for m in app.markdown)

    app.radio(key="ci_labels_images").set_value("One ImageNet class for all images").run()
    assert not app.exception, app.exception
    assert [k[3] for k in app.session_state["vitlab_results"]["ci_scores"]] == ["labels"]  # another loss: rescored
    assert any("against the given labels" in c.value for c in app.caption)


def _write_class_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for cls in ("207", "n01443537"):
        (root / cls).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / cls / "a.png")
    Image.new("RGB", (32, 32)).save(root / "loose.png")  # not inside a class sub-folder
    (root / "207" / "broken.png").write_bytes(b"not an image")


def test_random_efficientvit_on_a_labelled_folder(tmp_path, weights_folder):
    weights_folder(tmp_path / "no_weights")
    data = tmp_path / "data"
    _write_class_folder(data)
    app = AppTest.from_file(PAGE, default_timeout=180).run()
    app.selectbox(key="ci_model").select("efficientvit_m0").run()
    assert any("No pretrained weights found" in i.value for i in app.info) and not app.header  # explained

    app.checkbox(key="ci_random").check()
    app.radio(key="ci_source").set_value("Folder with class sub-folders").run()
    assert not app.exception, app.exception
    app.text_input(key="ci_folder").input(str(data)).run()
    assert not app.exception, app.exception
    assert app.radio(key="ci_labels_folder").value == "Folder labels"
    assert any("RANDOM" in w.value for w in app.warning)
    assert all(h.value.endswith("(RANDOM weights)") for h in app.header[:-1])
    assert any("against the given labels" in c.value for c in app.caption)
    assert any("loose.png: not inside a class sub-folder" in c.value for c in app.caption)
    assert any("broken.png: not a readable image" in c.value for c in app.caption)
    components = list(app.dataframe[0].value["component"])
    assert components == ["embed", "q", "k", "v", "q_dw", "proj", "ffn_hidden", "dw"]
    # Untrained EfficientViT: every score inside the blocks is 0, so no budget result may be stated.
    assert any("has the same score" in w.value and "no budget result" in w.value for w in app.warning)
    assert not any("of all channels kept" in m.value for m in app.markdown)
    assert not app.get("plotly_chart")

    (data / "not_a_class").mkdir()
    Image.new("RGB", (32, 32)).save(data / "not_a_class" / "b.png")
    app.run()
    assert not app.exception, app.exception
    assert any("not an ImageNet class" in e.value for e in app.error)


def test_fraction_kept_export_names_budget_normalisation_and_loss_target(tmp_path, weights_folder, downloads):
    """Issue 20: the fraction-kept CSV said nothing of the budget, normalisation and loss that produced it."""
    import io

    import pandas as pd

    weights_folder(tmp_path)
    app = AppTest.from_file(PAGE, default_timeout=180)
    app.session_state["ci_random"] = True
    app.run()
    app.slider(key="ci_budget").set_value(0.3)
    app.selectbox(key="ci_norm").set_value("layer").run()
    assert not app.exception, app.exception
    kept = pd.read_csv(io.BytesIO(downloads["fraction_kept_deit_tiny_patch16_224_random.csv"]))
    assert list(kept.columns[:3]) == ["model", "weights", "image"]
    assert (kept["budget_fraction_kept"] == 0.3).all() and (kept["normalisation"] == "layer").all()
    assert (kept["loss_target"] == "cross-entropy against the model's own top-1").all()
    scores = pd.read_csv(io.BytesIO(downloads["channel_importance_deit_tiny_patch16_224_random.csv"]))
    assert (scores["normalisation"] == "layer").all() and scores["loss_target"].str.startswith("cross-entropy").all()
