"""Where a result comes from, written into every export: model, weights source and image per row, and PNG titles."""
from __future__ import annotations

from typing import Sequence

import pandas as pd
from PIL import Image, ImageDraw

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
               image: str | Sequence[str] | None = None) -> pd.DataFrame:
    """A copy of ``frame`` with ``model``, ``weights`` and (unless it has one) ``image`` as its first columns.

    ``model`` None keeps the frame's own model column; ``weights`` and ``image`` are one value for every row,
    or one per row.
    """
    out = frame.copy()
    columns = {"model": out["model"].tolist() if model is None else model,
               "weights": weights if isinstance(weights, str) else list(weights)}
    if "image" not in out.columns and image is not None:
        columns["image"] = image if isinstance(image, str) else list(image)
    for position, (name, value) in enumerate(columns.items()):
        if name in out.columns:
            out = out.drop(columns=name)
        out.insert(position, name, value)
    return out


def images_label(names: Sequence[str]) -> str:
    """'a.jpg' or '3 images: a.jpg, b.jpg, c.jpg' for rows that summarise several images."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{len(names)} images: " + ", ".join(names)


def title_line(model: str, weights: str, image: str | None = None) -> str:
    parts = [model, f"weights: {weights}"] + ([f"image: {image}"] if image else [])
    return " | ".join(parts)


def with_title(picture: Image.Image, title: str, height: int = 20) -> Image.Image:
    """``picture`` on white under a one-line ``title`` (for PNG downloads that must say what they show)."""
    out = Image.new("RGB", (picture.size[0], picture.size[1] + height), "white")
    ImageDraw.Draw(out).text((4, 4), title, fill=(0, 0, 0))
    out.paste(picture.convert("RGB"), (0, height))
    return out
