"""Real browser, the analysis pages: what a user uploaded, set and computed is still theirs after another page."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest
from browser_support import (
    CHROMIUM,
    all_photos,
    away_and_back,
    charts_shown,
    open_page,
    photo_files,
    pick_option,
    slider_text,
    still_uses_uploads,
    upload_files,
    wait_until_idle,
)

pytestmark = pytest.mark.browser


def test_home_page_title_in_a_real_browser(app_url, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app_url)
        heading = page.get_by_role("heading", name="ViT Efficiency Lab")
        heading.wait_for(timeout=60_000)
        page.get_by_text("deit_tiny_patch16_224").first.wait_for(state="attached", timeout=60_000)
        shots = Path(os.environ.get("VITLAB_SCREENSHOT_DIR", tmp_path))
        page.screenshot(path=str(shots / "home.png"), full_page=True)
        browser.close()


PAGE_PATHS = ["token_reduction", "vision_language", "head_redundancy", "channel_importance", "throughput",
              "frontier"]


# What to click before the screenshot, where a page's first view is a form rather than a result.
SCREENSHOT_ACTIONS = {"vision_language": "Use a small random ViLT", "throughput": "Run benchmark",
                      "frontier": "Compute the frontier"}


# Pages whose README screenshot uses the shared photos and the sample images rather than the samples alone.
SCREENSHOT_UPLOADS = {"frontier"}


@pytest.mark.skipif(not os.environ.get("VITLAB_SCREENSHOT_DIR"), reason="set VITLAB_SCREENSHOT_DIR to screenshot every page")
def test_screenshot_every_page(app_url):
    """Not part of CI: renders each page in the browser and saves a full-page screenshot for the README."""
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ["VITLAB_SCREENSHOT_DIR"])
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        # Streamlit scrolls inside its own container, so a tall viewport is what shows the whole page.
        page = browser.new_page(viewport={"width": 1400, "height": 3600})
        for path in PAGE_PATHS:
            page.goto(f"{app_url}/{path}")
            page.get_by_role("heading").first.wait_for(timeout=60_000)
            wait_until_idle(page)
            if path in SCREENSHOT_UPLOADS:
                page.locator('[data-testid="stMain"] input[type="file"]').first.set_input_files(
                    [str(f) for f in all_photos(Path(tempfile.mkdtemp()))])
                time.sleep(2)
                wait_until_idle(page)
            if path in SCREENSHOT_ACTIONS:
                page.get_by_text(SCREENSHOT_ACTIONS[path]).first.click()
                time.sleep(1)
                wait_until_idle(page)
            page.screenshot(path=str(shots / f"{path}.png"), full_page=True)
        browser.close()


def test_token_reduction_keeps_uploads_settings_and_results_in_a_real_browser(shared_dir, app_url, tmp_path):
    """The image choice names the upload (chromium showed 'china'), and after Home and back the uploads, the
    keep ratio and the schedule are the ones the results were computed for."""
    from playwright.sync_api import sync_playwright

    heading = "Token reduction: pruning, merging and fusing tokens"
    with sync_playwright() as p:
        page = open_page(p, app_url, "token_reduction", heading, downloads=True)
        upload_files(page, photo_files(tmp_path))
        image = page.get_by_label("Image for the detailed view")
        assert image.input_value() == "first.png"
        page.get_by_role("slider", name="DynamicViT: keep ratio rho").press("ArrowLeft")  # 0.70 -> 0.65
        wait_until_idle(page)
        page.get_by_text("decreasing", exact=True).click()
        wait_until_idle(page)
        page.get_by_text("(rho = 0.65)").first.wait_for(timeout=30_000)

        away_and_back(page, "Token reduction", heading)
        assert page.get_by_text("Using your 2 uploaded images: first.png, second.png").count() == 1
        assert image.input_value() == "first.png"
        assert slider_text(page, "DynamicViT: keep ratio rho") == "0.65"
        assert page.get_by_text("(rho = 0.65)").count() >= 1  # the result shown is the one for the shown value
        assert page.get_by_role("radio", name="decreasing").is_checked()
        page.screenshot(path=str(tmp_path / "token_reduction_back.png"), full_page=True)
        page.get_by_role("slider", name="DynamicViT: keep ratio rho").press("ArrowRight")  # the next rerun
        wait_until_idle(page)
        page.get_by_text("(rho = 0.70)").first.wait_for(timeout=30_000)
        still_uses_uploads(page, "Using your 2 uploaded images: first.png, second.png", "Download agreement (CSV)",
                            "2 images: first.png, second.png", tmp_path)


def test_head_redundancy_keeps_uploads_and_choices_in_a_real_browser(shared_dir, app_url, tmp_path):
    from playwright.sync_api import sync_playwright

    heading = "Head redundancy: multi-head vs cascaded group attention"
    with sync_playwright() as p:
        page = open_page(p, app_url, "head_redundancy", heading, downloads=True)
        upload_files(page, photo_files(tmp_path))
        assert page.get_by_label("Image", exact=True).input_value() == "first.png"
        pick_option(page, "Image", "second.png")
        page.get_by_text("head outputs (linear CKA)", exact=True).click()
        wait_until_idle(page)

        away_and_back(page, "Head redundancy", heading)
        assert page.get_by_text("Using your 2 uploaded images: first.png, second.png").count() == 1
        assert page.get_by_label("Image", exact=True).input_value() == "second.png"
        assert page.get_by_role("radio", name="head outputs (linear CKA)").is_checked()
        assert charts_shown(page, 2).count() >= 2  # the analysis is shown again
        page.get_by_text("attention maps (cosine)", exact=True).click()  # the next rerun
        wait_until_idle(page)
        still_uses_uploads(page, "Using your 2 uploaded images: first.png, second.png",
                            "Download redundancy per head (CSV)", "2 images: first.png, second.png", tmp_path)


def test_channel_importance_keeps_budget_normalisation_and_uploads_in_a_real_browser(shared_dir, app_url, tmp_path):
    from playwright.sync_api import sync_playwright

    heading = "Channel importance (first-order Taylor)"
    with sync_playwright() as p:
        page = open_page(p, app_url, "channel_importance", heading, downloads=True)
        upload_files(page, photo_files(tmp_path))
        page.get_by_role("slider", name="Global budget: fraction of channels kept").press("ArrowRight")  # 0.55
        wait_until_idle(page)
        pick_option(page, "Normalisation before the global ranking", "layer:")

        away_and_back(page, "Channel importance", heading)
        assert slider_text(page, "Global budget: fraction of channels kept") == "0.55"
        assert page.get_by_label("Normalisation before the global ranking").input_value().startswith("layer:")
        assert page.get_by_text("With 55% of all channels kept").count() == 1  # computed at the shown budget
        page.get_by_role("slider", name="Global budget: fraction of channels kept").press("ArrowRight")  # 0.60
        wait_until_idle(page)
        page.get_by_text("With 60% of all channels kept").wait_for(timeout=30_000)
        still_uses_uploads(page, "Using your 2 uploaded images: first.png, second.png",
                            "Download fraction kept per block (CSV)", "2 images: first.png, second.png", tmp_path)
