"""Each analysis page draws a folder written by `python -m analysis.run` with its own charts."""
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from analysis.data.images import sample_images
from analysis.runs.cli import main as run_main

ROOT = Path(__file__).resolve().parents[1]
CASES = [  # page, task, radio choice (pages with several tasks), model
    ("token_reduction", "tome-merge", "tome-merge", "deit_tiny_patch16_224"),
    ("head_redundancy", "head-similarity", None, "efficientvit_m0"),
    ("channel_importance", "taylor", None, "efficientvit_m0"),
]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for sample in sample_images():
        sample.image.resize((160, 107)).save(folder / f"{sample.name}.jpg")
    return folder


@pytest.mark.parametrize("page, task, choice, model", CASES)
def test_page_draws_a_cli_run(page, task, choice, model, image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(tmp_path / "no-weights"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    assert run_main([task, "--model", model, "--random-weights", "--data", str(image_folder), "--out", str(out),
                     "--batch", "2", "--workers", "0", "--no-progress"]) == 0
    at = AppTest.from_file(str(ROOT / "pages" / f"{page}.py"), default_timeout=240).run()
    charts_before = len(at.get("plotly_chart"))
    if choice:
        at.radio(key="tr_run-task").set_value(choice).run()
    prefix = {"token_reduction": "tr_run", "head_redundancy": "hr_run", "channel_importance": "ci_run"}[page]
    at.text_input(key=f"{prefix}-folder").set_value(str(out)).run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.get("plotly_chart")) > charts_before
    assert any("RANDOM weights" in w.value for w in at.warning)
    assert any(b.label == "Download run.json" for b in at.get("download_button"))


def test_a_folder_of_another_task_is_refused(image_folder, tmp_path):
    out = tmp_path / "run"
    assert run_main(["tome-merge", "--model", "deit_tiny_patch16_224", "--random-weights", "--data",
                     str(image_folder), "--out", str(out), "--batch", "2", "--workers", "0", "--no-progress"]) == 0
    at = AppTest.from_file(str(ROOT / "pages" / "head_redundancy.py"), default_timeout=240).run()
    at.text_input(key="hr_run-folder").set_value(str(out)).run()
    assert not at.exception
    assert any("tome-merge" in e.value for e in at.error)
