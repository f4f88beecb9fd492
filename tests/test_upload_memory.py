"""A huge upload does not stay in server memory (issue 25): uploads are shrunk while they are decoded (JPEG at a
reduced scale) and the memory the decode freed is handed back. The 88-megapixel case runs a page function in
AppTest (a script thread, as in the server) in a subprocess, so that its resident memory is its own."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from analysis.data.images import UPLOAD_MAX_SIDE, load_image

ROOT = Path(__file__).resolve().parents[1]


def _jpeg(width: int, height: int) -> bytes:
    rng = np.random.default_rng(0)
    # Nearest-neighbour blocks: the same pixel count as a smooth resize, in a fraction of the time.
    noise = Image.fromarray(rng.integers(0, 255, (100, 110, 3), dtype=np.uint8)).resize((width, height),
                                                                                        Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    noise.save(buffer, format="JPEG", quality=70)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_an_upload_is_shrunk_to_the_longest_side_with_its_aspect(fmt):
    buffer = io.BytesIO()
    # A fast PNG (zlib level 1): what is tested is the decode, not how well the file was compressed.
    Image.open(io.BytesIO(_jpeg(5000, 3000))).save(buffer, format=fmt, **({"compress_level": 1} if fmt == "PNG" else {}))
    image = load_image(buffer.getvalue(), "big", max_side=UPLOAD_MAX_SIDE).image
    assert image.size == (UPLOAD_MAX_SIDE, round(UPLOAD_MAX_SIDE * 3 / 5)) and image.mode == "RGB"
    assert load_image(buffer.getvalue(), "big").image.size == (5000, 3000)  # without max_side: untouched
    small = load_image(_jpeg(300, 200), "small", max_side=UPLOAD_MAX_SIDE).image
    assert small.size == (300, 200)


PAGE = """
import json, sys
from streamlit.testing.v1 import AppTest

def page():
    import streamlit as st
    from timm.data import create_transform
    from analysis.data.images import to_batch
    from pages._widgets import image_picker
    images = image_picker("images")
    to_batch(images, create_transform(input_size=224, interpolation="bicubic", crop_pct=0.875))  # as pages do
    st.write(f"{images[0].name}: {images[0].image.size[0]}x{images[0].image.size[1]}")

def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024

data = open(sys.argv[1], "rb").read()
at = AppTest.from_function(page, default_timeout=120).run()
for _ in range(2):  # Streamlit's own first-run allocations are not the upload's
    at.run()
from PIL import Image
Image.new("RGB", (6000, 4000)).copy()  # a server that has run a while: glibc's mmap threshold has risen
before = rss()
at.file_uploader(key="images").set_value([("huge.jpg", data, "image/jpeg")]).run()
assert not at.exception, [e.value for e in at.exception]
print(json.dumps({"shown": at.markdown[0].value, "kept": rss() - before}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's per-thread arenas and /proc")
def test_an_88_megapixel_upload_leaves_little_memory_behind(tmp_path):
    upload = tmp_path / "huge.jpg"
    upload.write_bytes(_jpeg(11000, 8000))
    script = tmp_path / "page.py"
    script.write_text(PAGE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(upload)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["shown"] == f"huge.jpg: {UPLOAD_MAX_SIDE}x{round(UPLOAD_MAX_SIDE * 8000 / 11000)}"
    # The upload's bytes (a few MB) stay with the widget; the decoded 88-megapixel image (264 MB) must not.
    assert found["kept"] < 80 * 2**20, f"{found['kept'] / 2**20:.0f} MiB kept"
