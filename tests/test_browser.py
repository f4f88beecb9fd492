"""One real browser: `streamlit run app.py` headless, driven by Playwright in Debian's chromium."""
import os
import shutil
import socket
import subprocess
import sys
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


@pytest.fixture(scope="module")
def app_url():
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


PAGE_PATHS = ["token_reduction", "vision_language", "head_redundancy", "channel_importance", "throughput"]
# What to click before the screenshot, where a page's first view is a form rather than a result.
SCREENSHOT_ACTIONS = {"vision_language": "Use a small random ViLT", "throughput": "Run benchmark"}


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
            if path in SCREENSHOT_ACTIONS:
                page.get_by_text(SCREENSHOT_ACTIONS[path]).first.click()
                time.sleep(1)
                _wait_until_idle(page)
            page.screenshot(path=str(shots / f"{path}.png"), full_page=True)
        browser.close()


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
