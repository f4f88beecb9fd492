"""What the real-browser tests share: `streamlit run app.py` headless on a free port, driven by Playwright in
Debian's chromium, and the steps a user takes (open a page, upload, leave and come back, download).
"""
from __future__ import annotations

import contextlib
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(extra_env: dict[str, str] | None = None):
    if not Path(CHROMIUM).exists():
        if REQUIRE:
            pytest.fail("chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    port = free_port()
    env = dict(os.environ, VITLAB_WEIGHTS_DIR=str(ROOT.parent / "shared" / "weights"), HF_HUB_OFFLINE="1",
               **(extra_env or {}))
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
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:  # a loaded machine: the server's shutdown hooks did not finish in time
            proc.kill()
            proc.wait(timeout=20)


def launch_browser(p):
    return p.chromium.launch(
        executable_path=CHROMIUM,
        args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run"])


def fill_numbers(page, fields) -> None:
    """Type each (label, value) into its number input and let the page rerun."""
    for label, value in fields:
        field = page.get_by_label(label)
        field.fill(value)
        field.press("Enter")
        wait_until_idle(page)


def download_each(page, buttons, folder: Path, still_there) -> dict[str, Path]:
    """Click each download button once, save what arrives under ``folder``, and check ``still_there()`` after
    every click; {button label: saved file}."""
    saved = {}
    for name in buttons:
        with page.expect_download(timeout=60_000) as download:
            page.get_by_role("button", name=name).click()
        saved[name] = folder / download.value.suggested_filename
        download.value.save_as(saved[name])
        time.sleep(1)
        wait_until_idle(page)
        still_there()
    return saved


def all_photos(folder: Path) -> list[Path]:
    """The five shared photos and scikit-learn's two sample images as files (the samples written to ``folder``)."""
    from analysis.data.images import sample_images

    files = sorted((ROOT.parent / "shared" / "images").glob("photo_*.jpg"))
    for sample in sample_images():
        target = folder / f"_sample_{sample.name}.jpg"
        sample.image.save(target)
        files.append(target)
    return files


# Busy while Streamlit's own run state (the app root's data-test-script-state, set as soon as a rerun is requested
# or starts) says so, or while its status widget shows; one query per poll.
IS_BUSY = """() => {
    const app = document.querySelector('[data-testid="stApp"]');
    const state = app ? app.getAttribute("data-test-script-state") : null;
    return ["running", "rerunRequested", "stopRequested"].includes(state)
        || document.querySelector('[data-testid="stStatusWidget"]') !== null;
}"""


def wait_until_idle(page, limit_s: float = 300, settle_s: float = 1.0, poll_s: float = 0.25) -> None:
    """Wait until the script has not been running for ``settle_s``; the settle time covers the moment between a
    click and the server's "script started"."""
    deadline, quiet_since = time.time() + limit_s, None
    while time.time() < deadline:
        if page.evaluate(IS_BUSY):
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.time()
        elif time.time() - quiet_since > settle_s:
            return
        time.sleep(poll_s)


def charts_shown(page, at_least: int, timeout_ms: int = 60_000):
    """The page's plotly charts, once at least ``at_least`` are on it: Streamlit loads the chart component lazily,
    so on a busy machine a chart can mount a moment after the script has finished."""
    charts = page.locator('[data-testid="stPlotlyChart"]')
    charts.nth(at_least - 1).wait_for(timeout=timeout_ms)
    return charts


# Issue 20: what a user uploaded, set and computed is still there after another page, in a real browser.
def photo_files(folder: Path) -> list[Path]:
    from PIL import Image

    files = []
    for name, colour in (("first.png", (200, 30, 30)), ("second.png", (30, 30, 200))):
        Image.new("RGB", (96, 64), colour).save(folder / name)
        files.append(folder / name)
    return files


def open_page(p, url: str, path: str, heading: str, height: int = 2400, downloads: bool = False):
    """A new browser on ``url/path``, once its ``heading`` is there and the page has finished running."""
    page = launch_browser(p).new_page(viewport={"width": 1400, "height": height}, accept_downloads=downloads)
    page.goto(f"{url}/{path}")
    page.get_by_role("heading", name=heading).wait_for(timeout=60_000)
    wait_until_idle(page)
    return page


def upload_files(page, files) -> None:
    page.locator('[data-testid="stMain"] input[type="file"]').first.set_input_files([str(f) for f in files])
    time.sleep(1)
    wait_until_idle(page)


def still_uses_uploads(page, caption: str, button: str, names: str, folder: Path) -> None:
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
    wait_until_idle(page)


def slider_text(page, label: str) -> str:
    """The value a slider shows on its thumb."""
    slider = page.locator('[data-testid="stSlider"]').filter(has_text=label)
    return slider.locator('[data-testid="stSliderThumbValue"]').inner_text().strip()


def away_and_back(page, link: str, heading: str) -> None:
    """Home and back through the sidebar's links: one browser session, as a user navigates."""
    nav = page.locator('[data-testid="stSidebarNav"] a')
    nav.filter(has_text="Home").click()
    page.get_by_role("heading", name="ViT Efficiency Lab").wait_for(timeout=60_000)
    wait_until_idle(page)
    nav.filter(has_text=link).click()
    page.get_by_role("heading", name=heading).wait_for(timeout=60_000)
    wait_until_idle(page)


def add_option(page, label: str, option: str) -> None:
    """Add ``option`` (the start of its text) to the multiselect labelled ``label``."""
    box = page.locator('[data-testid="stMultiSelect"]').filter(has_text=label)
    box.locator("input").click()
    page.get_by_role("option", name=option).first.click()
    page.keyboard.press("Escape")
    wait_until_idle(page)


def pick_option(page, label: str, option: str) -> None:
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
            wait_until_idle(page)
    choice.click()
    wait_until_idle(page)
