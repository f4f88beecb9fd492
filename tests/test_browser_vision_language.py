"""Real browser, Vision-language: model, question, upload and answers stay after another page; the VQA frontier
section scores uploaded questions."""
from __future__ import annotations

import pytest
from browser_support import (
    away_and_back,
    download_each,
    fill_numbers,
    open_page,
    photo_files,
    still_uses_uploads,
    upload_files,
    wait_until_idle,
)

pytestmark = pytest.mark.browser


def test_vision_language_keeps_model_question_upload_and_answers_in_a_real_browser(app_url, tmp_path):
    from playwright.sync_api import sync_playwright

    heading = "Vision-language: PuMer on ViLT and METER"
    with sync_playwright() as p:
        page = open_page(p, app_url, "vision_language", heading, downloads=True)
        page.get_by_text("Use a small random ViLT").first.click()
        wait_until_idle(page)
        upload_files(page, photo_files(tmp_path)[:1])
        question = page.get_by_label("Question", exact=True)
        question.fill("What colour is the sky?")
        question.press("Enter")
        wait_until_idle(page)

        away_and_back(page, "Vision-language", heading)
        assert page.get_by_role("checkbox", name="Use a small random ViLT").is_checked()
        assert page.get_by_label("Question", exact=True).input_value() == "What colour is the sky?"
        assert page.locator('[data-testid="stDataFrame"]').count() >= 2  # answers and records
        page.get_by_role("slider", name="Image prune ratio").press("ArrowRight")  # the next rerun
        wait_until_idle(page)
        still_uses_uploads(page, "Using your 1 uploaded image: first.png", "Download reduce steps (CSV)",
                            "first.png", tmp_path)


def _uploader(page, label: str):
    return page.locator('[data-testid="stFileUploader"]').filter(has_text=label).locator('input[type="file"]')


def test_vqa_frontier_section_scores_uploaded_questions_and_keeps_them_in_a_real_browser(app_url, tmp_path):
    """Issue 32: a questions file and its images uploaded, the table's variants cleared and three typed ones scored
    and timed beside the unreduced model (every offered variant is scored in tests/test_page_vqa_section.py), chart,
    table and downloads; after Home and back the questions and the frontier are still there."""
    import json

    from playwright.sync_api import sync_playwright

    heading = "Vision-language: PuMer on ViLT and METER"
    photos = photo_files(tmp_path)
    questions = tmp_path / "my_questions.jsonl"
    questions.write_text(
        json.dumps({"image": "first.png", "question": "What colour is it?", "answers": ["red"] * 7 + ["pink"] * 3})
        + "\n" + json.dumps({"image": "second.png", "question": "Is it blue?", "answers": ["yes"] * 10}) + "\n")
    with sync_playwright() as p:
        page = open_page(p, app_url, "vision_language", heading, height=4200, downloads=True)
        page.get_by_text("Use a small random ViLT").first.click()
        wait_until_idle(page)
        _uploader(page, "Questions file").set_input_files(str(questions))
        wait_until_idle(page)
        _uploader(page, "Images the questions name").set_input_files([str(f) for f in photos])
        wait_until_idle(page)
        fill_numbers(page, (("Batch (answering and timing)", "2"), ("Interleaved timing rounds", "1")))
        variants = page.locator('[data-testid="stMultiSelect"]').filter(has_text="Variants (the unreduced model")
        variants.get_by_role("button", name="Clear all").click()
        wait_until_idle(page)
        typed = page.get_by_label("Other variants (space separated, e.g. pumer,prune=0.5,reduce=1-4-7)")
        typed.fill("pumer tome=8 size=288")
        typed.press("Enter")
        wait_until_idle(page)
        page.get_by_role("button", name="Compute the VQA frontier").click()
        page.get_by_role("button", name="Download points (CSV)").wait_for(timeout=300_000)
        wait_until_idle(page)
        chart = page.locator('[data-testid="stPlotlyChart"]').filter(has_text="questions per second")
        chart.first.wait_for(timeout=60_000)  # the chart component loads lazily

        def still_there() -> None:
            assert page.get_by_role("button", name="Download points (CSV)").count() == 1
            assert chart.count() == 1

        saved = download_each(page, ("Download points (CSV)", "Download answers per question (CSV)"), tmp_path,
                              still_there)
        points = saved["Download points (CSV)"].read_text()
        assert len(points.strip().splitlines()) == 1 + 4  # the unreduced model and the three typed variants
        assert "unreduced" in points and "pumer" in points and "tome=8" in points and "size=288" in points
        answers = saved["Download answers per question (CSV)"].read_text()
        assert "first.png" in answers and "second.png" in answers and "Is it blue?" in answers

        away_and_back(page, "Vision-language", heading)
        assert page.get_by_text("Using your uploaded questions file my_questions.jsonl").count() == 1
        still_there()
