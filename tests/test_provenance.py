"""What every export says about how it was made: PNG titles that fit their picture, file names, settings columns."""
from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from analysis.provenance import file_name, label_rows, title_line, with_title

LONG_TITLE = ("block 11, query CLS token | " + title_line(
    "deit_tiny_patch16_224", "local file /home/someone/weights/deit_tiny_patch16_224.safetensors", "photo_1.jpg"))


def test_a_png_title_wider_than_its_picture_wraps_and_keeps_its_last_words():
    """The head-redundancy sheet's title ended at '| image': the rest ran off the picture's right edge."""
    picture = Image.new("RGB", (224, 100), (0, 0, 0))
    titled = with_title(picture, LONG_TITLE)
    band = np.asarray(titled.convert("L"))[: titled.size[1] - 100]
    assert band.shape[0] > 40  # several lines, not one 20-px line
    ink_rows = np.flatnonzero((band < 128).any(axis=1))
    assert ink_rows.max() > band.shape[0] * 0.7  # the last line is written, not only the first
    assert not (band[:, -3:] < 128).any()  # nothing touches the right edge
    assert (np.asarray(titled)[-100:] == 0).all()  # the picture itself is untouched


def test_file_names_drop_the_image_extension():
    assert file_name("attention", "deit_tiny_patch16_224", "block11", "photo 1.jpg") == \
        "attention_deit_tiny_patch16_224_block11_photo_1.png"
    assert file_name("stages", "m", "rho0.7", "a.PNG") == "stages_m_rho0.7_a.png"
    assert file_name("stages", "china") == "stages_china.png"


def test_settings_become_columns_after_model_weights_and_image():
    frame = pd.DataFrame({"image": ["a", "b"], "score": [1.0, 2.0]})
    out = label_rows(frame, "m", "random", None, {"rho": 0.7, "tome_r": ["4", "8"]})
    assert list(out.columns) == ["model", "weights", "image", "rho", "tome_r", "score"]
    assert list(out["tome_r"]) == ["4", "8"] and (out["rho"] == 0.7).all() and list(out["image"]) == ["a", "b"]
