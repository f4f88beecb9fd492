"""Where a result comes from, written into every export: model, weights source and image per row, and PNG titles."""
from __future__ import annotations

import re
import textwrap
from pathlib import PurePath
from typing import Any, Mapping, Sequence

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

RANDOM = "random"
UNTRAINED_PREDICTORS = "untrained DynamicViT predictors"


def weights_label(source, untrained_predictors: bool = False) -> str:
    """Short text for a ``models.weights.WeightsSource``: 'random', 'local file <path>', 'hub <tag>', ...

    ``untrained_predictors`` appends that DynamicViT's score predictors were freshly initialised.
    """
    if getattr(source, "is_random", False):
        text = RANDOM
    else:
        kind = getattr(source, "kind", "")
        kind = str(getattr(kind, "value", kind))
        location = getattr(source, "location", "")
        text = f"{kind} {location}".strip()
    return f"{text} + {UNTRAINED_PREDICTORS}" if untrained_predictors else text


def label_rows(frame: pd.DataFrame, model: str | None, weights: str | Sequence[str],
               image: str | Sequence[str] | None = None, settings: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """A copy of ``frame`` with ``model``, ``weights``, (unless it has one) ``image`` and then every one of
    ``settings`` (name -> value: the settings that produced the rows) as its first columns.

    ``model`` None keeps the frame's own model column; ``weights`` and ``image`` are one value for every row,
    or one per row; so is each setting's value (a string or number is one value for every row).
    """
    out = frame.copy()
    columns = {"model": out["model"].tolist() if model is None else model,
               "weights": weights if isinstance(weights, str) else list(weights)}
    if "image" in out.columns:  # the frame's own, per row
        columns["image"] = out["image"].tolist()
    elif image is not None:
        columns["image"] = image if isinstance(image, str) else list(image)
    for name, value in (settings or {}).items():
        columns[name] = list(value) if isinstance(value, (list, tuple, pd.Series)) else value
    for position, (name, value) in enumerate(columns.items()):
        if name in out.columns:
            out = out.drop(columns=name)
        out.insert(position, name, value)
    return out


def images_label(names: Sequence[str]) -> str:
    """'a.jpg' or '3 images: a.jpg, b.jpg, c.jpg' for rows that summarise several images."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{len(names)} images: " + ", ".join(names)


def settings_text(settings: Mapping[str, Any]) -> str:
    """'rho 0.7, ToMe r 13' from {name: value}: the settings named in a title (None values left out)."""
    return ", ".join(f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"
                     for name, value in settings.items() if value is not None)


def title_line(model: str, weights: str, image: str | None = None,
               settings: Mapping[str, Any] | None = None) -> str:
    parts = ([settings_text(settings)] if settings else []) + [model, f"weights: {weights}"]
    return " | ".join(parts + ([f"image: {image}"] if image else []))


def figure_title(text: str, width: int = 80) -> tuple[str, int]:
    """A plotly title broken into lines of at most ``width`` characters ('<br>'), and the top margin in pixels
    that shows all of them (plotly cuts a long one-line title off at the figure's edge)."""
    lines = textwrap.wrap(text, width, break_on_hyphens=False) or [""]
    return "<br>".join(lines), 50 + 22 * len(lines)


def file_name(*parts: str, suffix: str = ".png") -> str:
    """A download's file name from its parts; an image's own extension is dropped ('maps', 'a.jpg' ->
    'maps_a.png', never 'maps_a.jpg.png') and characters a file system may refuse become '_'."""
    stems = [PurePath(str(p)).stem if PurePath(str(p)).suffix.lower() in _IMAGE_SUFFIXES else str(p) for p in parts]
    return re.sub(r"[^\w.=-]+", "_", "_".join(s for s in stems if s)) + suffix


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
_MARGIN = 4


def wrap_title(title: str, width: int, font=None) -> list[str]:
    """``title`` broken at spaces into lines that each fit ``width`` pixels (a word longer than a line is cut
    between characters), so that nothing of a PNG's title is lost off its right edge."""
    font = font or ImageFont.load_default()
    room = max(width - 2 * _MARGIN, 1)

    def fits(text: str) -> bool:
        return font.getlength(text) <= room

    lines: list[str] = []
    line = ""
    for word in title.split(" "):
        candidate = f"{line} {word}" if line else word
        if fits(candidate):
            line = candidate
            continue
        if line:
            lines.append(line)
        while not fits(word) and len(word) > 1:  # a path longer than the picture is wide
            cut = max(i for i in range(1, len(word) + 1) if fits(word[:i]) or i == 1)
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    return lines + ([line] if line else [])


def with_title(picture: Image.Image, title: str, line_height: int = 14) -> Image.Image:
    """``picture`` on white under ``title``, wrapped to the picture's width (for PNG downloads that must say
    what they show: every word of the title is in the image)."""
    font = ImageFont.load_default()
    lines = wrap_title(title, picture.size[0], font)
    height = 2 * _MARGIN + line_height * len(lines)
    out = Image.new("RGB", (picture.size[0], picture.size[1] + height), "white")
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((_MARGIN, _MARGIN + i * line_height), line, fill=(0, 0, 0), font=font)
    out.paste(picture.convert("RGB"), (0, height))
    return out
