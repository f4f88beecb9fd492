"""Real browser, the timing pages: Live throughput, the frontier and Where the time goes compute, download and keep."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from browser_support import (
    add_option,
    away_and_back,
    charts_shown,
    download_each,
    fill_numbers,
    launch_browser,
    open_page,
    photo_files,
    upload_files,
    wait_until_idle,
)

pytestmark = pytest.mark.browser


def test_frontier_computes_and_keeps_its_points_through_downloads(shared_dir, app_url, tmp_path):
    """Issue 15: the frontier page, real DeiT-Tiny on the sample photos: chart, table and both downloads.

    ``shared_dir`` first: without the real weights it skips before a server starts (it used to wait 300 s)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 2600}, accept_downloads=True)
        page.goto(f"{app_url}/frontier")
        page.get_by_role("heading", name="Accuracy vs throughput: what each setting buys here").wait_for(timeout=60_000)
        wait_until_idle(page)
        fill_numbers(page, (("Throughput batch size", "1"), ("Interleaved timing rounds", "1")))
        page.get_by_role("button", name="Compute the frontier").click()
        page.get_by_role("button", name="Download points (CSV)").wait_for(timeout=300_000)
        wait_until_idle(page)
        assert charts_shown(page, 1).count() == 1

        def still_there() -> None:
            assert page.locator('[data-testid="stPlotlyChart"]').count() == 1
            assert page.get_by_role("button", name="Download points (CSV)").count() == 1

        saved = download_each(page, ("Download points (CSV)", "Download points (JSON)"), tmp_path, still_there)
        rows = saved["Download points (CSV)"].read_text().splitlines()
        assert rows[0].startswith("model,weights,image,setting,") and len(rows) == 1 + 11  # unreduced, 4 r, 3 EViT, 3 rho
        assert all(',"2 images: china, flower",' in row for row in rows[1:])  # the images, named on every row
        assert "deit_tiny_patch16_224.safetensors" in rows[1] and "(untrained predictors)" in rows[-1]
        assert '"points"' in saved["Download points (JSON)"].read_text()
        browser.close()


def test_throughput_and_frontier_keep_settings_uploads_and_results_in_a_real_browser(fresh_app_url, tmp_path):
    """Issues 12.1 and 30: one benchmark run on a server nobody has visited, then both downloads arrive and the
    table, the charts and the buttons stay; the settings and the result survive Home and back; the frontier
    keeps its settings and uploads through Home and back and one more widget."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        page = open_page(p, fresh_app_url, "throughput", "Live throughput", downloads=True)
        # A fresh server's first visit straight to a page URL still runs inside app.py: sidebar and titles.
        page.get_by_text("Upload a checkpoint").wait_for(timeout=30_000)
        assert page.get_by_text("Live throughput", exact=True).count() >= 1
        settings = (("Batch size", "1"), ("Timed iterations per round", "1"), ("Interleaved rounds (median counts)", "2"))
        fill_numbers(page, settings)
        page.get_by_role("button", name="Run benchmark").click()
        page.get_by_role("button", name="Download CSV").wait_for(timeout=240_000)
        wait_until_idle(page)
        charts = charts_shown(page, 2)
        assert charts.count() == 2

        def still_there() -> None:  # the result is still there after each click: no return to the form
            assert page.get_by_text("Pick models and press").count() == 0
            assert charts.count() == 2 and page.locator('[data-testid="stDataFrame"]').count() == 1
            assert page.get_by_role("button", name="Download CSV").count() == 1
            assert page.get_by_role("button", name="Download JSON").count() == 1

        saved = download_each(page, ("Download CSV", "Download JSON"), tmp_path, still_there)
        assert saved["Download CSV"].name == "throughput.csv" and saved["Download JSON"].name == "throughput.json"
        header = saved["Download CSV"].read_text().splitlines()[0]
        assert header.startswith("model,weights,image,")
        assert '"weights": "random"' in saved["Download JSON"].read_text()
        page.screenshot(path=str(tmp_path / "throughput_after_downloads.png"), full_page=True)

        away_and_back(page, "Live throughput", "Live throughput")
        assert [page.get_by_label(label).input_value() for label, _ in settings] == ["1", "1", "2"]
        assert page.get_by_role("button", name="Download CSV").count() == 1
        assert page.get_by_text("the settings above have changed since").count() == 0  # results match the form

        frontier = "Accuracy vs throughput: what each setting buys here"
        page.locator('[data-testid="stSidebarNav"] a').filter(has_text="Accuracy vs throughput").click()
        page.get_by_role("heading", name=frontier).wait_for(timeout=60_000)
        wait_until_idle(page)
        fill_numbers(page, (("Throughput batch size", "1"), ("Interleaved timing rounds", "1")))
        upload_files(page, photo_files(tmp_path))
        away_and_back(page, "Accuracy vs throughput", frontier)
        assert page.get_by_label("Throughput batch size").input_value() == "1"
        assert page.get_by_label("Interleaved timing rounds").input_value() == "1"
        assert page.get_by_text("Using your 2 uploaded images: first.png, second.png").count() == 1
        fill_numbers(page, (("Throughput batch size", "2"),))  # the next rerun (the frontier is not computed here)
        assert page.get_by_text("Using your 2 uploaded images: first.png, second.png").count() == 1
        assert page.get_by_text("No upload: using the bundled sample photos").count() == 0


def test_breakdown_page_profiles_two_engines_and_keeps_results_through_downloads(app_url, tmp_path):
    """Issues 21 and 31: "Where the time goes" profiles DeiT-Tiny and EfficientViT-M0 under eager PyTorch and ONNX
    Runtime: whether the attribution adds up comes first, the engines side by side, the roofline with the
    hardware's peak; the tables and the raw trace download and the charts stay."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        page = open_page(p, app_url, "breakdown", "Where the time goes", height=4400, downloads=True)
        fill_numbers(page, (("Profiled forwards (each next to a plain one)", "1"),))
        add_option(page, "Engines", "ONNX Runtime")
        page.get_by_role("button", name="Profile").click()
        page.get_by_role("button", name="Per-operator table (CSV)").wait_for(timeout=300_000)
        wait_until_idle(page)
        charts = charts_shown(page, 5)
        # operator classes, components, attention vs FFN per block, engines side by side, roofline
        assert charts.count() == 5
        assert page.get_by_text("Does the attribution add up?").count() == 1
        assert page.get_by_text("Engines side by side: how much memory-bound time each removes").count() == 1
        assert page.get_by_text("efficientvit_m0 [onnxruntime] b8").count() >= 1

        def still_there() -> None:
            assert page.get_by_text("press **Profile**").count() == 0
            assert charts.count() == 5 and page.locator('[data-testid="stDataFrame"]').count() == 4

        saved = download_each(page, ("Per-operator table (CSV)", "Engines table (CSV)",
                                     "Raw trace (Chrome JSON, opens in Perfetto)"), tmp_path, still_there)
        header = saved["Per-operator table (CSV)"].read_text().splitlines()[0]
        assert header.startswith("model,op,op_class,component,ms,calls,flops,bytes")
        engines_csv = saved["Engines table (CSV)"].read_text()
        assert "eager PyTorch" in engines_csv and "ONNX Runtime" in engines_csv
        import json
        trace = json.loads(saved["Raw trace (Chrome JSON, opens in Perfetto)"].read_text())
        assert any(e.get("name", "").startswith("vitlab::attention") for e in trace["traceEvents"])
        shots = os.environ.get("VITLAB_SCREENSHOT_DIR")
        page.screenshot(path=str(Path(shots) / "breakdown.png" if shots else tmp_path / "breakdown.png"),
                        full_page=True)
