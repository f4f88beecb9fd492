"""One real browser: `streamlit run app.py` headless, driven by Playwright in Debian's chromium."""
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
REQUIRE = os.environ.get("VITLAB_REQUIRE_ALL") == "1"

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _running_app():
    if not Path(CHROMIUM).exists():
        if REQUIRE:
            pytest.fail("chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    port = _free_port()
    env = dict(os.environ, VITLAB_WEIGHTS_DIR=str(ROOT.parent / "shared" / "weights"), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.fileWatcherType", "none", "--server.port", str(port), "--server.address", "127.0.0.1",
         "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("streamlit did not start within 90 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def app_url():
    with _running_app() as url:
        yield url


@pytest.fixture
def fresh_app_url():
    """A server nobody has visited yet: its first request goes straight to a page URL."""
    with _running_app() as url:
        yield url


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


def _browser(p):
    return p.chromium.launch(
        executable_path=CHROMIUM,
        args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run"])


def test_throughput_downloads_keep_the_results_on_the_page(fresh_app_url, tmp_path):
    """Issue 12.1: after one run, both downloads arrive and the table, the charts and the buttons stay."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        page = _open(p, fresh_app_url, "throughput", "Live throughput", downloads=True)
        # A fresh server's first visit straight to a page URL still runs inside app.py: sidebar and titles.
        page.get_by_text("Upload a checkpoint").wait_for(timeout=30_000)
        assert page.get_by_text("Live throughput", exact=True).count() >= 1
        _fill_numbers(page, (("Batch size", "1"), ("Timed iterations per round", "1"),
                             ("Interleaved rounds (median counts)", "2")))
        page.get_by_role("button", name="Run benchmark").click()
        page.get_by_role("button", name="Download CSV").wait_for(timeout=240_000)
        _wait_until_idle(page)
        charts = page.locator('[data-testid="stPlotlyChart"]')
        assert charts.count() == 2

        def still_there() -> None:  # the result is still there after each click: no return to the form
            assert page.get_by_text("Pick models and press").count() == 0
            assert charts.count() == 2 and page.locator('[data-testid="stDataFrame"]').count() == 1
            assert page.get_by_role("button", name="Download CSV").count() == 1
            assert page.get_by_role("button", name="Download JSON").count() == 1

        saved = _download_each(page, ("Download CSV", "Download JSON"), tmp_path, still_there)
        assert saved["Download CSV"].name == "throughput.csv" and saved["Download JSON"].name == "throughput.json"
        header = saved["Download CSV"].read_text().splitlines()[0]
        assert header.startswith("model,weights,image,")
        assert '"weights": "random"' in saved["Download JSON"].read_text()
        page.screenshot(path=str(tmp_path / "throughput_after_downloads.png"), full_page=True)


def test_frontier_computes_and_keeps_its_points_through_downloads(shared_dir, app_url, tmp_path):
    """Issue 15: the frontier page, real DeiT-Tiny on the sample photos: chart, table and both downloads.

    ``shared_dir`` first: without the real weights it skips before a server starts (it used to wait 300 s)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 2600}, accept_downloads=True)
        page.goto(f"{app_url}/frontier")
        page.get_by_role("heading", name="Accuracy vs throughput: what each setting buys here").wait_for(timeout=60_000)
        _wait_until_idle(page)
        _fill_numbers(page, (("Throughput batch size", "1"), ("Interleaved timing rounds", "1")))
        page.get_by_role("button", name="Compute the frontier").click()
        page.get_by_role("button", name="Download points (CSV)").wait_for(timeout=300_000)
        _wait_until_idle(page)
        assert page.locator('[data-testid="stPlotlyChart"]').count() == 1

        def still_there() -> None:
            assert page.locator('[data-testid="stPlotlyChart"]').count() == 1
            assert page.get_by_role("button", name="Download points (CSV)").count() == 1

        saved = _download_each(page, ("Download points (CSV)", "Download points (JSON)"), tmp_path, still_there)
        rows = saved["Download points (CSV)"].read_text().splitlines()
        assert rows[0].startswith("model,weights,image,setting,") and len(rows) == 1 + 11  # unreduced, 4 r, 3 EViT, 3 rho
        assert all(',"2 images: china, flower",' in row for row in rows[1:])  # the images, named on every row
        assert "deit_tiny_patch16_224.safetensors" in rows[1] and "(untrained predictors)" in rows[-1]
        assert '"points"' in saved["Download points (JSON)"].read_text()
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
            _wait_until_idle(page)
            if path in SCREENSHOT_UPLOADS:
                page.locator('[data-testid="stMain"] input[type="file"]').first.set_input_files(
                    [str(f) for f in _all_photos(Path(tempfile.mkdtemp()))])
                time.sleep(2)
                _wait_until_idle(page)
            if path in SCREENSHOT_ACTIONS:
                page.get_by_text(SCREENSHOT_ACTIONS[path]).first.click()
                time.sleep(1)
                _wait_until_idle(page)
            page.screenshot(path=str(shots / f"{path}.png"), full_page=True)
        browser.close()


def _fill_numbers(page, fields) -> None:
    """Type each (label, value) into its number input and let the page rerun."""
    for label, value in fields:
        field = page.get_by_label(label)
        field.fill(value)
        field.press("Enter")
        _wait_until_idle(page)


def _download_each(page, buttons, folder: Path, still_there) -> dict[str, Path]:
    """Click each download button once, save what arrives under ``folder``, and check ``still_there()`` after
    every click; {button label: saved file}."""
    saved = {}
    for name in buttons:
        with page.expect_download(timeout=60_000) as download:
            page.get_by_role("button", name=name).click()
        saved[name] = folder / download.value.suggested_filename
        download.value.save_as(saved[name])
        time.sleep(1)
        _wait_until_idle(page)
        still_there()
    return saved


def _all_photos(folder: Path) -> list[Path]:
    """The five shared photos and scikit-learn's two sample images as files (the samples written to ``folder``)."""
    from analysis.data.images import sample_images

    files = sorted((ROOT.parent / "shared" / "images").glob("photo_*.jpg"))
    for sample in sample_images():
        target = folder / f"_sample_{sample.name}.jpg"
        sample.image.save(target)
        files.append(target)
    return files


def _wait_until_idle(page, limit_s: float = 300) -> None:
    """Streamlit shows its status widget while the script runs; wait until it has been gone for 3 s."""
    deadline, quiet_since = time.time() + limit_s, None
    while time.time() < deadline:
        busy = page.locator('[data-testid="stStatusWidget"]').count() > 0
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.time()
        elif time.time() - quiet_since > 3:
            return
        time.sleep(0.5)


# Issue 20: what a user uploaded, set and computed is still there after another page, in a real browser.
def _photo_files(folder: Path) -> list[Path]:
    from PIL import Image

    files = []
    for name, colour in (("first.png", (200, 30, 30)), ("second.png", (30, 30, 200))):
        Image.new("RGB", (96, 64), colour).save(folder / name)
        files.append(folder / name)
    return files


def _open(p, url: str, path: str, heading: str, height: int = 2400, downloads: bool = False):
    """A new browser on ``url/path``, once its ``heading`` is there and the page has finished running."""
    page = _browser(p).new_page(viewport={"width": 1400, "height": height}, accept_downloads=downloads)
    page.goto(f"{url}/{path}")
    page.get_by_role("heading", name=heading).wait_for(timeout=60_000)
    _wait_until_idle(page)
    return page


def _upload(page, files) -> None:
    page.locator('[data-testid="stMain"] input[type="file"]').first.set_input_files([str(f) for f in files])
    time.sleep(1)
    _wait_until_idle(page)


def _still_uses_uploads(page, caption: str, button: str, names: str, folder: Path) -> None:
    """Issue 30: after Home and back and one more widget, the page still shows ``caption`` (not the samples) and
    the CSV behind ``button`` names the uploads (``names``)."""
    assert page.get_by_text(caption).count() == 1
    assert page.get_by_text("No upload: using the bundled sample photos").count() == 0
    with page.expect_download(timeout=60_000) as download:
        page.get_by_role("button", name=button).click()
    saved = folder / download.value.suggested_filename
    download.value.save_as(saved)
    text = saved.read_text()
    assert names in text and "china" not in text and "flower" not in text
    time.sleep(1)
    _wait_until_idle(page)


def _slider_text(page, label: str) -> str:
    """The value a slider shows on its thumb."""
    slider = page.locator('[data-testid="stSlider"]').filter(has_text=label)
    return slider.locator('[data-testid="stSliderThumbValue"]').inner_text().strip()


def _away_and_back(page, link: str, heading: str) -> None:
    """Home and back through the sidebar's links: one browser session, as a user navigates."""
    nav = page.locator('[data-testid="stSidebarNav"] a')
    nav.filter(has_text="Home").click()
    page.get_by_role("heading", name="ViT Efficiency Lab").wait_for(timeout=60_000)
    _wait_until_idle(page)
    nav.filter(has_text=link).click()
    page.get_by_role("heading", name=heading).wait_for(timeout=60_000)
    _wait_until_idle(page)


def test_token_reduction_keeps_uploads_settings_and_results_in_a_real_browser(shared_dir, app_url, tmp_path):
    """The image choice names the upload (chromium showed 'china'), and after Home and back the uploads, the
    keep ratio and the schedule are the ones the results were computed for."""
    from playwright.sync_api import sync_playwright

    heading = "Token reduction: pruning, merging and fusing tokens"
    with sync_playwright() as p:
        page = _open(p, app_url, "token_reduction", heading, downloads=True)
        _upload(page, _photo_files(tmp_path))
        image = page.get_by_label("Image for the detailed view")
        assert image.input_value() == "first.png"
        page.get_by_role("slider", name="DynamicViT: keep ratio rho").press("ArrowLeft")  # 0.70 -> 0.65
        _wait_until_idle(page)
        page.get_by_text("decreasing", exact=True).click()
        _wait_until_idle(page)
        page.get_by_text("(rho = 0.65)").first.wait_for(timeout=30_000)

        _away_and_back(page, "Token reduction", heading)
        assert page.get_by_text("Using your 2 uploaded images: first.png, second.png").count() == 1
        assert image.input_value() == "first.png"
        assert _slider_text(page, "DynamicViT: keep ratio rho") == "0.65"
        assert page.get_by_text("(rho = 0.65)").count() >= 1  # the result shown is the one for the shown value
        assert page.get_by_role("radio", name="decreasing").is_checked()
        page.screenshot(path=str(tmp_path / "token_reduction_back.png"), full_page=True)
        page.get_by_role("slider", name="DynamicViT: keep ratio rho").press("ArrowRight")  # the next rerun
        _wait_until_idle(page)
        page.get_by_text("(rho = 0.70)").first.wait_for(timeout=30_000)
        _still_uses_uploads(page, "Using your 2 uploaded images: first.png, second.png", "Download agreement (CSV)",
                            "2 images: first.png, second.png", tmp_path)


def _pick(page, label: str, option: str) -> None:
    """Choose ``option`` (the start of its text) in the selectbox labelled ``label``."""
    field = page.get_by_label(label, exact=True)
    opener = page.locator('[data-testid="stSelectbox"]').filter(has=field).get_by_role("button", name="Open")
    choice = page.get_by_role("option", name=option).first
    for _ in range(3):  # a rerun that ends just after the click closes the list: open it again
        opener.click()
        try:
            choice.wait_for(timeout=10_000)
            break
        except Exception:  # noqa: BLE001 - playwright's TimeoutError
            _wait_until_idle(page)
    choice.click()
    _wait_until_idle(page)


def test_head_redundancy_keeps_uploads_and_choices_in_a_real_browser(shared_dir, app_url, tmp_path):
    from playwright.sync_api import sync_playwright

    heading = "Head redundancy: multi-head vs cascaded group attention"
    with sync_playwright() as p:
        page = _open(p, app_url, "head_redundancy", heading, downloads=True)
        _upload(page, _photo_files(tmp_path))
        assert page.get_by_label("Image", exact=True).input_value() == "first.png"
        _pick(page, "Image", "second.png")
        page.get_by_text("head outputs (linear CKA)", exact=True).click()
        _wait_until_idle(page)

        _away_and_back(page, "Head redundancy", heading)
        assert page.get_by_text("Using your 2 uploaded images: first.png, second.png").count() == 1
        assert page.get_by_label("Image", exact=True).input_value() == "second.png"
        assert page.get_by_role("radio", name="head outputs (linear CKA)").is_checked()
        assert page.locator('[data-testid="stPlotlyChart"]').count() >= 2  # the analysis is shown again
        page.get_by_text("attention maps (cosine)", exact=True).click()  # the next rerun
        _wait_until_idle(page)
        _still_uses_uploads(page, "Using your 2 uploaded images: first.png, second.png",
                            "Download redundancy per head (CSV)", "2 images: first.png, second.png", tmp_path)


def test_channel_importance_keeps_budget_normalisation_and_uploads_in_a_real_browser(shared_dir, app_url, tmp_path):
    from playwright.sync_api import sync_playwright

    heading = "Channel importance (first-order Taylor)"
    with sync_playwright() as p:
        page = _open(p, app_url, "channel_importance", heading, downloads=True)
        _upload(page, _photo_files(tmp_path))
        page.get_by_role("slider", name="Global budget: fraction of channels kept").press("ArrowRight")  # 0.55
        _wait_until_idle(page)
        _pick(page, "Normalisation before the global ranking", "layer:")

        _away_and_back(page, "Channel importance", heading)
        assert _slider_text(page, "Global budget: fraction of channels kept") == "0.55"
        assert page.get_by_label("Normalisation before the global ranking").input_value().startswith("layer:")
        assert page.get_by_text("With 55% of all channels kept").count() == 1  # computed at the shown budget
        page.get_by_role("slider", name="Global budget: fraction of channels kept").press("ArrowRight")  # 0.60
        _wait_until_idle(page)
        page.get_by_text("With 60% of all channels kept").wait_for(timeout=30_000)
        _still_uses_uploads(page, "Using your 2 uploaded images: first.png, second.png",
                            "Download fraction kept per block (CSV)", "2 images: first.png, second.png", tmp_path)


def test_vision_language_keeps_model_question_upload_and_answers_in_a_real_browser(app_url, tmp_path):
    from playwright.sync_api import sync_playwright

    heading = "Vision-language: PuMer on ViLT and METER"
    with sync_playwright() as p:
        page = _open(p, app_url, "vision_language", heading, downloads=True)
        page.get_by_text("Use a small random ViLT").first.click()
        _wait_until_idle(page)
        _upload(page, _photo_files(tmp_path)[:1])
        question = page.get_by_label("Question", exact=True)
        question.fill("What colour is the sky?")
        question.press("Enter")
        _wait_until_idle(page)

        _away_and_back(page, "Vision-language", heading)
        assert page.get_by_role("checkbox", name="Use a small random ViLT").is_checked()
        assert page.get_by_label("Question", exact=True).input_value() == "What colour is the sky?"
        assert page.locator('[data-testid="stDataFrame"]').count() >= 2  # answers and records
        page.get_by_role("slider", name="Image prune ratio").press("ArrowRight")  # the next rerun
        _wait_until_idle(page)
        _still_uses_uploads(page, "Using your 1 uploaded image: first.png", "Download reduce steps (CSV)",
                            "first.png", tmp_path)


def test_throughput_and_frontier_keep_settings_uploads_and_results_in_a_real_browser(app_url, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        page = _open(p, app_url, "throughput", "Live throughput")
        settings = (("Batch size", "1"), ("Timed iterations per round", "1"), ("Interleaved rounds (median counts)", "2"))
        _fill_numbers(page, settings)
        page.get_by_role("button", name="Run benchmark").click()
        page.get_by_role("button", name="Download CSV").wait_for(timeout=240_000)
        _wait_until_idle(page)
        _away_and_back(page, "Live throughput", "Live throughput")
        assert [page.get_by_label(label).input_value() for label, _ in settings] == ["1", "1", "2"]
        assert page.get_by_role("button", name="Download CSV").count() == 1
        assert page.get_by_text("the settings above have changed since").count() == 0  # results match the form

        frontier = "Accuracy vs throughput: what each setting buys here"
        page.locator('[data-testid="stSidebarNav"] a').filter(has_text="Accuracy vs throughput").click()
        page.get_by_role("heading", name=frontier).wait_for(timeout=60_000)
        _wait_until_idle(page)
        _fill_numbers(page, (("Throughput batch size", "1"), ("Interleaved timing rounds", "1")))
        _upload(page, _photo_files(tmp_path))
        _away_and_back(page, "Accuracy vs throughput", frontier)
        assert page.get_by_label("Throughput batch size").input_value() == "1"
        assert page.get_by_label("Interleaved timing rounds").input_value() == "1"
        assert page.get_by_text("Using your 2 uploaded images: first.png, second.png").count() == 1
        _fill_numbers(page, (("Throughput batch size", "2"),))  # the next rerun (the frontier is not computed here)
        assert page.get_by_text("Using your 2 uploaded images: first.png, second.png").count() == 1
        assert page.get_by_text("No upload: using the bundled sample photos").count() == 0


@pytest.fixture
def breakdown_app_url(tmp_path_factory):
    """A server whose roofline is already cached (small sizes), so the page does not measure the machine first."""
    from analysis.timing import roofline

    cache = tmp_path_factory.mktemp("roof") / "roof.json"
    previous = os.environ.get(roofline.CACHE_ENV)
    os.environ[roofline.CACHE_ENV] = str(cache)
    roofline.machine_roofline("cpu", matmul_sizes=(512,), copy_mib=32)
    try:
        with _running_app() as url:
            yield url
    finally:
        if previous is None:
            os.environ.pop(roofline.CACHE_ENV, None)
        else:
            os.environ[roofline.CACHE_ENV] = previous


def test_breakdown_page_profiles_and_keeps_results_through_downloads(breakdown_app_url, tmp_path):
    """Issue 21: "Where the time goes" profiles DeiT-Tiny and EfficientViT-M0; the table and the raw trace
    download and the charts stay."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        page = _open(p, breakdown_app_url, "breakdown", "Where the time goes", height=3600, downloads=True)
        _fill_numbers(page, (("Profiled forwards (each next to a plain one)", "1"),))
        page.get_by_role("button", name="Profile").click()
        page.get_by_role("button", name="Per-operator table (CSV)").wait_for(timeout=240_000)
        _wait_until_idle(page)
        charts = page.locator('[data-testid="stPlotlyChart"]')
        assert charts.count() == 4  # operator classes, components, attention vs FFN per block, roofline

        def still_there() -> None:
            assert page.get_by_text("press **Profile**").count() == 0
            assert charts.count() == 4 and page.locator('[data-testid="stDataFrame"]').count() == 2

        saved = _download_each(page, ("Per-operator table (CSV)", "Raw trace (Chrome JSON, opens in Perfetto)"),
                               tmp_path, still_there)
        header = saved["Per-operator table (CSV)"].read_text().splitlines()[0]
        assert header.startswith("model,op,op_class,component,ms,calls,flops,bytes")
        import json
        trace = json.loads(saved["Raw trace (Chrome JSON, opens in Perfetto)"].read_text())
        assert any(e.get("name", "").startswith("vitlab::attention") for e in trace["traceEvents"])
        shots = os.environ.get("VITLAB_SCREENSHOT_DIR")
        page.screenshot(path=str(Path(shots) / "breakdown.png" if shots else tmp_path / "breakdown.png"),
                        full_page=True)
