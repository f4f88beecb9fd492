"""The vision-language page's "Accuracy on your questions" section (AppTest): a questions file and the sample photos,
variants from the method table, the frontier chart, table and downloads, kept across reruns and model switches.
One test: the page's own single-question part runs first on every start (the expensive part)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from analysis.vision_language.vqa_accuracy import vqa_accuracy

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "vision_language.py")
VILT, METER = "vilt_b32_vqa", "meter_clip16_288_vqa"
QUESTIONS = [{"image": "china.jpg", "question": "What is it?", "answers": ["bird"] * 2 + ["dog"] * 8},
             {"image": "flower.jpg", "question": "What color?", "answers": ["red"] * 3 + ["bird"] * 3 + ["no"] * 4}]


@pytest.fixture
def page(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(tmp_path))
    st.cache_resource.clear()
    app = AppTest.from_file(PAGE, default_timeout=180).run()
    app.checkbox(key=f"vl_random_{VILT}").check().run()
    yield app
    st.cache_resource.clear()


@pytest.fixture
def evaluations(monkeypatch):
    import pages._vqa_section as section

    calls = []
    original = section.evaluate

    def counted(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(section, "evaluate", counted)
    return calls


def test_section_scores_variants_of_the_table_and_keeps_the_result(page, downloads, evaluations):
    app = page
    assert not app.exception and app.button(key="vl_vqa_compute").proto.disabled  # nothing to score yet
    assert any('"image": "china.jpg"' in c.value for c in app.code)  # the format, before any upload
    offered = " ".join(app.multiselect(key=f"vl_vqa_variants_{VILT}").options)  # label  [variant text]
    assert all(f"[{text}]" in offered for text in ("pumer", "pumer,prune=0", "pumer,reduce=0-1-2"))
    assert "PuMer: merging only" in offered

    bad = json.dumps({"image": "elsewhere.jpg", "question": "Why?"}).encode()
    app.file_uploader(key="vl_vqa_questions").set_value([("bad.jsonl", bad, "application/json")]).run()
    assert any("elsewhere.jpg" in e.value and "uploaded images" in e.value for e in app.error)
    assert app.button(key="vl_vqa_compute").proto.disabled

    lines = "".join(json.dumps(q) + "\n" for q in QUESTIONS).encode()
    app.file_uploader(key="vl_vqa_questions").set_value([("mine.jsonl", lines, "application/json")]).run()
    app.multiselect(key=f"vl_vqa_variants_{VILT}").set_value(["pumer"]).run()
    app.text_input(key=f"vl_vqa_other_{VILT}").set_value("pumer,prune=0.5 size=256").run()
    app.number_input(key="vl_vqa_batch").set_value(2).run()
    app.number_input(key="vl_vqa_rounds").set_value(1).run()
    app.button(key="vl_vqa_compute").click().run()
    assert not app.exception, [e.value for e in app.exception]
    assert not app.error, [e.value for e in app.error]
    assert evaluations == [VILT]

    table = app.dataframe[-1].value
    assert list(table["setting"]) == ["unreduced", "PuMer (paper setting)", "PuMer paper setting, prune=0.5",
                                      "Input size 256 px"]  # on the model and images at 256 px
    assert (table["metric"] == "VQA accuracy").all() and (table["img_per_s"] > 0).all()
    assert any("percentile bootstrap" in c.value and "load" in c.value for c in app.caption)
    assert any("RANDOM weights" in w.value for w in app.warning)
    chart = app.get("plotly_chart")[-1].proto.spec
    assert "questions per second" in chart and "PuMer (paper setting)" in chart

    answers = pd.read_csv(io.BytesIO(downloads["vqa_answers_vilt_tiny_random.csv"]))
    for column in (c for c in answers.columns if c.endswith(" answer")):
        expected = [vqa_accuracy(a, q["answers"]) for a, q in zip(answers[column], QUESTIONS)]
        assert list(answers[column.replace(" answer", " accuracy")]) == pytest.approx(expected)
    points = json.loads(downloads["vqa_frontier_vilt_tiny_random.json"])
    assert points["points"][0]["variant"] == VILT and "interval" in points
    assert "vqa_frontier_vilt_tiny_random.csv" in downloads

    app.run()  # a rerun shows the stored frontier, computes nothing
    assert evaluations == [VILT] and app.dataframe[-1].value.equals(table)
    app.radio(key="vl_model").set_value(METER).run()
    app.radio(key="vl_model").set_value(VILT).run()
    assert evaluations == [VILT] and app.dataframe[-1].value.equals(table)
    assert app.multiselect(key=f"vl_vqa_variants_{VILT}").value == ["pumer"]
    assert app.number_input(key="vl_vqa_batch").value == 2

