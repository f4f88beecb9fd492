"""Real browser, Vision-language: model, question, upload and answers stay after another page."""
from __future__ import annotations

import pytest
from browser_support import (
    away_and_back,
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
